package shim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/daemon"
	eventsapi "github.com/containerd/containerd/api/events"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// BoxFile is the file in a container's bundle that names its box, for the
// shim's delete action after the serving shim died.
const BoxFile = "boxd-box"

// Config is what a task service serves.
type Config struct {
	Namespace string // containerd's namespace of the container
	ID        string // the container's id
	Boxes     Boxes
	Events    Publisher
	Log       *slog.Logger
	// Exit is called once containerd asks the shim to go (Shutdown with no
	// task left).
	Exit func()
	// Pods finds the boxes of the pods whose sandboxes the shim serves,
	// for a pod's other containers; nil serves none.
	Pods Pods
}

// Service is the task service of one container (containerd.task.v2.Task).
type Service struct {
	cfg    Config
	boxes  Boxes
	log    *slog.Logger
	ctx    context.Context // the processes' streams run under it
	cancel context.CancelFunc

	// mu protects the fields below and the processes' fields.
	mu           sync.Mutex
	box          string // "" until Create made it
	bundle       string
	pod          bool   // the box is a pod's, which the container has a part of
	label        string // with pod, the key of the box's label for the container
	root         string // with pod, the container's root file system in the box
	prefix       string // begins the agent ids of its processes (agentPrefix)
	init         *process
	execs        map[string]*process
	paused       bool
	checkpointed bool // the box holds a checkpoint: Delete stops it, not removes it
	deleted      bool
}

var _ taskapi.TTRPCTaskService = (*Service)(nil)

// New returns the task service of cfg's container.
func New(cfg Config) *Service {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Service{cfg: cfg, boxes: cfg.Boxes, log: cfg.Log, ctx: ctx, cancel: cancel, execs: map[string]*process{}}
}

// Close ends the streams of the processes (they run on in the box).
func (s *Service) Close() { s.cancel() }

// Box returns the container's box ("" before Create).
func (s *Service) Box() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.box
}

// process returns the task's process execID ("" for init). The caller
// holds mu.
func (s *Service) process(id, execID string) (*process, error) {
	if id != s.cfg.ID {
		return nil, fmt.Errorf("task %s: this shim serves %s: %w", id, s.cfg.ID, errdefs.ErrNotFound)
	}
	if s.init == nil || s.deleted {
		return nil, fmt.Errorf("task %s: not created: %w", id, errdefs.ErrNotFound)
	}
	if execID == "" {
		return s.init, nil
	}
	p, ok := s.execs[execID]
	if !ok {
		return nil, fmt.Errorf("exec %s of task %s: %w", execID, id, errdefs.ErrNotFound)
	}
	return p, nil
}

// Create makes the container's box from its root file system (or from a
// checkpoint) and records its init process, which Start runs.
func (s *Service) Create(ctx context.Context, r *taskapi.CreateTaskRequest) (*taskapi.CreateTaskResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.ID != s.cfg.ID {
		return nil, fmt.Errorf("task %s: this shim serves %s: %w", r.ID, s.cfg.ID, errdefs.ErrInvalidArgument)
	}
	if s.init != nil {
		return nil, fmt.Errorf("task %s: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	spec, err := readBundle(r.Bundle)
	if err != nil {
		return nil, err
	}
	oci, err := readSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	if sandbox := sandboxOf(oci, r.ID); sandbox != "" {
		return s.createInPod(ctx, r, sandbox, spec, containerLabel(oci, r.ID))
	}
	req := daemon.CreateRequest{Labels: Labels(s.cfg.Namespace, r.ID)}
	maps.Copy(req.Labels, podLabels(oci))
	restore := r.Checkpoint != ""
	if restore {
		ck, err := ReadCheckpoint(r.Checkpoint)
		if err != nil {
			return nil, err
		}
		req.From = ck.Snapshot
	} else {
		if req.Rootfs, err = rootfsSource(r.Rootfs); err != nil {
			return nil, err
		}
	}
	bx, err := s.createBox(ctx, r.ID, req)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(r.Bundle, BoxFile), []byte(bx+"\n"), 0o644); err != nil {
		s.removeBox(bx)
		return nil, fmt.Errorf("recording box %s in bundle %s: %w", bx, r.Bundle, err)
	}
	s.box, s.bundle = bx, r.Bundle
	s.init = newProcess("", InitProcess, spec, stdio{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal})
	s.init.restored = restore
	s.log.Info("created the container's box", "box", bx, "restored", restore)
	s.cfg.Events.Publish(&eventsapi.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs, Checkpoint: r.Checkpoint,
		IO: &eventsapi.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskapi.CreateTaskResponse{}, nil
}

// createInPod gives container r.ID, of the pod whose sandbox is sandbox, a
// part of the pod's box: its root file system there, and its processes,
// which run in it.
func (s *Service) createInPod(ctx context.Context, r *taskapi.CreateTaskRequest, sandbox string, spec agent.ProcessSpec, label map[string]string) (*taskapi.CreateTaskResponse, error) {
	if r.Checkpoint != "" {
		return nil, fmt.Errorf("container %s of pod %s: a pod's container is not restored from a checkpoint: %w", r.ID, sandbox, errdefs.ErrNotImplemented)
	}
	source, err := rootfsSource(r.Rootfs)
	if err != nil {
		return nil, err
	}
	bx, root, err := s.joinPod(ctx, r.ID, sandbox, source, label)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(r.Bundle, BoxFile), []byte(bx+"\n"+podMember+"\n"+labelKey(label)+"\n"), 0o644); err != nil {
		_ = leavePod(ctx, s.boxes, bx, r.ID, labelKey(label))
		return nil, fmt.Errorf("recording box %s in bundle %s: %w", bx, r.Bundle, err)
	}
	s.box, s.bundle, s.pod, s.root, s.prefix, s.label = bx, r.Bundle, true, root, agentPrefix(r.ID, true), labelKey(label)
	spec.Root, spec.Hostname = root, "" // the pod's hostname is the box's
	s.init = newProcess("", s.prefix+InitProcess, spec, stdio{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal})
	s.log.Info("created the container in its pod's box", "box", bx, "pod", sandbox, "root", root)
	s.cfg.Events.Publish(&eventsapi.TaskCreate{
		ContainerID: r.ID, Bundle: r.Bundle, Rootfs: r.Rootfs,
		IO: &eventsapi.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
	})
	return &taskapi.CreateTaskResponse{}, nil
}

// createBox makes the box of container id, named BoxName; when that name
// is taken (a box kept for its checkpoints, or one a killed shim left),
// by a name that adds the time.
func (s *Service) createBox(ctx context.Context, id string, req daemon.CreateRequest) (string, error) {
	req.Name = BoxName(s.cfg.Namespace, id)
	_, err := s.boxes.Create(ctx, req)
	if errors.Is(err, errdefs.ErrAlreadyExists) {
		req.Name = BoxName(s.cfg.Namespace, fmt.Sprintf("%s@%d", id, time.Now().UnixNano()))
		_, err = s.boxes.Create(ctx, req)
	}
	if err != nil {
		return "", createError(err)
	}
	return req.Name, nil
}

// createError says what failed to make a box; a daemon that does not run
// is one sentence naming its socket.
func createError(err error) error {
	var nr *daemon.NotRunningError
	if errors.As(err, &nr) {
		return fmt.Errorf("boxd daemon is not running: nothing answers on %s (set BOXD_ROOT or BOXD_SOCKET in containerd's environment to its root's): %w",
			daemon.SocketPath(nr.Root), errdefs.ErrUnavailable)
	}
	return fmt.Errorf("making the container's box: %w", err)
}

// removeBox removes box name, logging a failure.
func (s *Service) removeBox(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.boxes.Remove(ctx, name); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		s.log.Error("removing the container's box", "box", name, "err", err)
	}
}

// Start runs a created process in the box (a restored init attaches to
// the one the checkpoint holds) and returns its pid there.
func (s *Service) Start(ctx context.Context, r *taskapi.StartRequest) (*taskapi.StartResponse, error) {
	s.mu.Lock()
	p, err := s.process(r.ID, r.ExecID)
	if err == nil && p.state != stateCreated {
		err = fmt.Errorf("process %s of task %s: already started: %w", p.agentID, r.ID, errdefs.ErrFailedPrecondition)
	}
	if err == nil && p.execID != "" && s.init.state != stateRunning {
		err = fmt.Errorf("task %s is not running: %w", r.ID, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	spec := p.spec
	if p.restored {
		spec = attachSpec(p.agentID)
	}
	streams, err := p.io.open(ctx)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	p.state, p.streams = stateRunning, streams
	closeStdin := p.closeStdin
	s.mu.Unlock()

	ended := make(chan struct{})
	var failed error // written before ended is closed
	go func() {
		status := s.stream(s.ctx, p, spec, streams.io, &failed)
		close(ended)
		streams.close()
		<-p.startedOnce
		s.exit(p, status)
	}()
	pid, err := s.findPid(ctx, p, ended, &failed)
	s.unpausedByUse()
	s.mu.Lock()
	p.pid = pid
	s.mu.Unlock()
	if err == nil {
		if p.execID == "" {
			s.cfg.Events.Publish(&eventsapi.TaskStart{ContainerID: r.ID, Pid: pid})
		} else {
			s.cfg.Events.Publish(&eventsapi.TaskExecStarted{ContainerID: r.ID, ExecID: p.execID, Pid: pid})
		}
	}
	close(p.startedOnce)
	if err != nil {
		return nil, err
	}
	if closeStdin {
		s.closeStdin(ctx, p)
	}
	return &taskapi.StartResponse{Pid: pid}, nil
}

// attachSpec takes up the streams of kept process id.
func attachSpec(id string) agent.ProcessSpec { return agent.ProcessSpec{ID: id, Attach: true} }

// sigKILL is SIGKILL's number on Linux.
const sigKILL = 9

// exit records that p exited with status. Once init exits the task's
// execs are killed: in a container they die with it.
func (s *Service) exit(p *process, status uint32) {
	s.mu.Lock()
	if p.state == stateExited {
		s.mu.Unlock()
		return
	}
	p.state, p.status, p.exitedAt = stateExited, status, time.Now()
	id := s.cfg.ID
	if p.execID != "" {
		id = p.execID
	}
	// The event goes before Wait answers: containerd hears of the exit
	// no later than its client.
	s.cfg.Events.Publish(&eventsapi.TaskExit{ContainerID: s.cfg.ID, ID: id, Pid: p.pid, ExitStatus: status, ExitedAt: timestamppb.New(p.exitedAt)})
	close(p.exited)
	var orphans []string
	if p.execID == "" {
		for _, e := range s.execs {
			if e.state == stateRunning {
				orphans = append(orphans, e.agentID)
			}
		}
	}
	s.mu.Unlock()
	s.log.Info("process exited", "process", p.agentID, "status", status)
	for _, a := range orphans {
		if err := s.boxes.SignalProcess(s.ctx, s.box, a, sigKILL); err != nil {
			s.log.Warn("killing an exec after the task's exit", "process", a, "err", err)
		}
	}
}

// unpausedByUse records that a call to a process in the box unpaused it:
// the daemon takes any call to its agent for a use of the box, and a use
// unpauses a paused box.
func (s *Service) unpausedByUse() {
	s.mu.Lock()
	was := s.paused
	s.paused = false
	s.mu.Unlock()
	if was {
		s.log.Info("the box was unpaused to reach its process", "box", s.box)
		s.cfg.Events.Publish(&eventsapi.TaskResumed{ContainerID: s.cfg.ID})
	}
}

// Wait returns once the process exited, with its status.
func (s *Service) Wait(ctx context.Context, r *taskapi.WaitRequest) (*taskapi.WaitResponse, error) {
	s.mu.Lock()
	p, err := s.process(r.ID, r.ExecID)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	select {
	case <-p.exited:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &taskapi.WaitResponse{ExitStatus: p.status, ExitedAt: timestamppb.New(p.exitedAt)}, nil
}

// State reports the process; the task of a paused box is PAUSED.
func (s *Service) State(ctx context.Context, r *taskapi.StateRequest) (*taskapi.StateResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	st := &taskapi.StateResponse{
		ID: r.ID, ExecID: r.ExecID, Bundle: s.bundle, Pid: p.pid,
		Stdin: p.io.stdin, Stdout: p.io.stdout, Stderr: p.io.stderr, Terminal: p.io.terminal,
	}
	switch p.state {
	case stateCreated:
		st.Status = task.Status_CREATED
	case stateRunning:
		st.Status = task.Status_RUNNING
		if s.paused {
			st.Status = task.Status_PAUSED
		}
	case stateExited:
		st.Status = task.Status_STOPPED
		st.ExitStatus, st.ExitedAt = p.status, timestamppb.New(p.exitedAt)
	}
	return st, nil
}

// Kill signals the process (with All, every process of the task). A
// process not yet started exits at once, as if the signal killed it.
func (s *Service) Kill(ctx context.Context, r *taskapi.KillRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	targets := []*process{p}
	if r.All && r.ExecID == "" {
		for _, e := range s.execs {
			targets = append(targets, e)
		}
	}
	var signal []string
	var unstarted []*process
	for _, t := range targets {
		switch t.state {
		case stateRunning:
			signal = append(signal, t.agentID)
		case stateCreated:
			unstarted = append(unstarted, t)
		}
	}
	s.mu.Unlock()
	if len(signal)+len(unstarted) == 0 {
		return nil, fmt.Errorf("process %s of task %s: already finished: %w", p.agentID, r.ID, errdefs.ErrNotFound)
	}
	for _, t := range unstarted {
		close(t.startedOnce)
		s.exit(t, 128+r.Signal)
	}
	for _, a := range signal {
		s.unpausedByUse() // before the process can exit
		if err := s.boxes.SignalProcess(ctx, s.box, a, int(r.Signal)); err != nil {
			return nil, fmt.Errorf("signalling process %s in box %s: %w", a, s.box, err)
		}
	}
	return &emptypb.Empty{}, nil
}

// Delete forgets an exited process. Deleting the task (init) removes its
// box, or stops it when it holds a checkpoint.
func (s *Service) Delete(ctx context.Context, r *taskapi.DeleteRequest) (*taskapi.DeleteResponse, error) {
	s.mu.Lock()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	if p.state == stateRunning {
		s.mu.Unlock()
		return nil, fmt.Errorf("process %s of task %s is running: kill it first: %w", p.agentID, r.ID, errdefs.ErrFailedPrecondition)
	}
	if p.state == stateCreated {
		p.state, p.exitedAt = stateExited, time.Now()
		close(p.exited)
		close(p.startedOnce)
	}
	resp := &taskapi.DeleteResponse{Pid: p.pid, ExitStatus: p.status, ExitedAt: timestamppb.New(p.exitedAt)}
	if p.execID != "" {
		delete(s.execs, p.execID)
		s.mu.Unlock()
		if err := s.boxes.ForgetProcess(ctx, s.box, p.agentID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			s.log.Warn("forgetting an exec", "process", p.agentID, "err", err)
		}
		return resp, nil
	}
	s.deleted = true
	bx, keep, bundle, pod, label := s.box, s.checkpointed, s.bundle, s.pod, s.label
	s.mu.Unlock()
	if pod {
		if err := leavePod(ctx, s.boxes, bx, r.ID, label); err != nil {
			s.log.Warn("taking the container out of its pod's box", "box", bx, "err", err)
		}
		_ = os.Remove(filepath.Join(bundle, BoxFile))
	} else if keep {
		if _, err := s.boxes.Stop(ctx, bx); err != nil {
			s.log.Warn("stopping the box that holds the container's checkpoints", "box", bx, "err", err)
		}
		_ = os.Remove(filepath.Join(bundle, BoxFile))
		s.log.Info("kept the container's box for its checkpoints", "box", bx)
	} else {
		s.removeBox(bx)
	}
	s.cfg.Events.Publish(&eventsapi.TaskDelete{ContainerID: r.ID, Pid: p.pid, ExitStatus: p.status, ExitedAt: resp.ExitedAt})
	return resp, nil
}

// Pids lists the task's processes that run: its kept processes in the box.
func (s *Service) Pids(ctx context.Context, r *taskapi.PidsRequest) (*taskapi.PidsResponse, error) {
	s.mu.Lock()
	_, err := s.process(r.ID, "")
	bx, paused, prefix := s.box, s.paused, s.prefix
	var known []*task.ProcessInfo
	for _, p := range append([]*process{s.init}, slices.Collect(maps.Values(s.execs))...) {
		if p.state == stateRunning && p.pid != 0 {
			known = append(known, &task.ProcessInfo{Pid: p.pid})
		}
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if paused {
		// Asking the box would unpause it: the daemon takes any call to
		// its agent for a use.
		return &taskapi.PidsResponse{Processes: known}, nil
	}
	list, err := s.boxes.Processes(ctx, bx)
	if err != nil {
		return nil, fmt.Errorf("listing the processes of box %s: %w", bx, err)
	}
	resp := &taskapi.PidsResponse{}
	for _, info := range list {
		if info.Running && ownProcess(info.ID, prefix) {
			resp.Processes = append(resp.Processes, &task.ProcessInfo{Pid: uint32(info.Pid)})
		}
	}
	return resp, nil
}

// Connect tells containerd the shim's and the task's pids.
func (s *Service) Connect(ctx context.Context, r *taskapi.ConnectRequest) (*taskapi.ConnectResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	resp := &taskapi.ConnectResponse{ShimPid: uint32(os.Getpid()), Version: "boxd"}
	if s.init != nil {
		resp.TaskPid = s.init.pid
	}
	return resp, nil
}

// busy says whether the container's task was made and not deleted.
func (s *Service) busy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.init != nil && !s.deleted
}

// Shutdown lets the shim go once its task was deleted (or never made).
func (s *Service) Shutdown(ctx context.Context, r *taskapi.ShutdownRequest) (*emptypb.Empty, error) {
	if s.busy() && !r.Now {
		return &emptypb.Empty{}, nil
	}
	s.cancel()
	if s.cfg.Exit != nil {
		s.cfg.Exit()
	}
	return &emptypb.Empty{}, nil
}

// Update is not implemented: a box's size is fixed when it is made.
func (s *Service) Update(ctx context.Context, r *taskapi.UpdateTaskRequest) (*emptypb.Empty, error) {
	return nil, fmt.Errorf("updating a boxd task's resources: %w", errdefs.ErrNotImplemented)
}
