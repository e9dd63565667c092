package shim

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
	eventsapi "github.com/containerd/containerd/api/events"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Pause pauses the task's box: every process of the task stops at once.
func (s *Service) Pause(ctx context.Context, r *taskapi.PauseRequest) (*emptypb.Empty, error) {
	return s.setPaused(ctx, r.ID, true)
}

// Resume unpauses the task's box.
func (s *Service) Resume(ctx context.Context, r *taskapi.ResumeRequest) (*emptypb.Empty, error) {
	return s.setPaused(ctx, r.ID, false)
}

// setPaused pauses or unpauses task id's box and says so to containerd.
func (s *Service) setPaused(ctx context.Context, id string, paused bool) (*emptypb.Empty, error) {
	bx, err := s.running(id)
	if err != nil {
		return nil, err
	}
	change, what := s.boxes.Unpause, "resuming"
	if paused {
		change, what = s.boxes.Pause, "pausing"
	}
	if _, err := change(ctx, bx); err != nil {
		return nil, fmt.Errorf("%s box %s: %w", what, bx, err)
	}
	s.mu.Lock()
	s.paused = paused
	s.mu.Unlock()
	if paused {
		s.cfg.Events.Publish(&eventsapi.TaskPaused{ContainerID: id})
	} else {
		s.cfg.Events.Publish(&eventsapi.TaskResumed{ContainerID: id})
	}
	return &emptypb.Empty{}, nil
}

// running returns the box of task id when its init process runs.
func (s *Service) running(id string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.process(id, "")
	if err != nil {
		return "", err
	}
	if p.state != stateRunning {
		return "", fmt.Errorf("task %s is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	if s.pod {
		// Pausing or snapshotting the box would be the whole pod's.
		return "", fmt.Errorf("task %s runs in its pod's box, which pauses and checkpoints with the pod alone: %w", id, errdefs.ErrNotImplemented)
	}
	return s.box, nil
}

// CheckpointFile is the file in a checkpoint folder that names the box
// snapshot the checkpoint is.
const CheckpointFile = "boxd-checkpoint.json"

// Checkpoint is what CheckpointFile holds.
type Checkpoint struct {
	Box      string `json:"box"`      // the box it was taken of
	Snapshot string `json:"snapshot"` // the box's snapshot: its disk and memory
}

// Checkpoint snapshots the task's box (disk and memory, its processes
// running) and writes the snapshot's name into r.Path, which containerd
// keeps in the checkpoint image. The box is then kept (stopped) when the
// task is deleted, for its snapshot to outlive the task.
func (s *Service) Checkpoint(ctx context.Context, r *taskapi.CheckpointTaskRequest) (*emptypb.Empty, error) {
	bx, err := s.running(r.ID)
	if err != nil {
		return nil, err
	}
	if r.Path == "" {
		return nil, fmt.Errorf("checkpoint of task %s: no folder: %w", r.ID, errdefs.ErrInvalidArgument)
	}
	snap, err := s.snapshot(ctx, bx)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.checkpointed = true
	s.mu.Unlock()
	data, err := json.Marshal(Checkpoint{Box: bx, Snapshot: snap.Name})
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(r.Path, 0o755); err != nil {
		return nil, fmt.Errorf("checkpoint folder: %w", err)
	}
	if err := os.WriteFile(filepath.Join(r.Path, CheckpointFile), data, 0o644); err != nil {
		return nil, fmt.Errorf("writing the checkpoint: %w", err)
	}
	s.log.Info("checkpointed the container's box", "box", bx, "snapshot", snap.Name)
	s.cfg.Events.Publish(&eventsapi.TaskCheckpointed{ContainerID: r.ID, Checkpoint: r.Path})
	return &emptypb.Empty{}, nil
}

// snapshot snapshots box bx for a checkpoint; containerd pauses the task
// first, and a paused box stays paused through its snapshot.
func (s *Service) snapshot(ctx context.Context, bx string) (snapshotter.Snapshot, error) {
	snap, err := s.boxes.Snapshot(ctx, bx, fmt.Sprintf("checkpoint-%d", time.Now().UnixNano()))
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshotting box %s: %w", bx, err)
	}
	return snap, nil
}

// ReadCheckpoint reads the checkpoint in folder dir.
func ReadCheckpoint(dir string) (Checkpoint, error) {
	data, err := os.ReadFile(filepath.Join(dir, CheckpointFile))
	if err != nil {
		return Checkpoint{}, fmt.Errorf("checkpoint %s is not boxd's: %w: %w", dir, err, errdefs.ErrInvalidArgument)
	}
	var ck Checkpoint
	if err := json.Unmarshal(data, &ck); err != nil || ck.Snapshot == "" {
		return Checkpoint{}, fmt.Errorf("checkpoint %s: %s names no snapshot: %w", dir, CheckpointFile, errdefs.ErrInvalidArgument)
	}
	return ck, nil
}
