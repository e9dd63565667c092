package shim

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
)

func TestRunOutputBeforeWait(t *testing.T) {
	h := newHarness(t)
	s := h.streams("init", false)
	if status := h.run(s, "echo", "hello", "box"); status != 0 {
		t.Fatalf("exit status %d, want 0", status)
	}
	// Wait answered: the shim's ends of the fifos are closed and every
	// byte is in them.
	if got := s.out.text(t); got != "hello box\n" {
		t.Errorf("stdout %q", got)
	}
	if got := s.errOut.text(t); got != "err\n" {
		t.Errorf("stderr %q", got)
	}
	req := h.boxes.requests[0]
	if req.Name != BoxName(testNS, testID) || req.Rootfs != h.rootfs()[0].Source ||
		req.Labels[LabelNamespace] != testNS || req.Labels[LabelID] != testID {
		t.Errorf("create request %+v", req)
	}
	if data, err := os.ReadFile(filepath.Join(h.dir, "bundle", BoxFile)); err != nil || strings.TrimSpace(string(data)) != req.Name {
		t.Errorf("bundle's %s: %q, %v", BoxFile, data, err)
	}
	if _, err := h.svc.Delete(h.ctx, &taskapi.DeleteRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.boxes.Get(h.ctx, req.Name); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after Delete the box is still there: %v", err)
	}
	want := []string{TopicTaskCreate, TopicTaskStart, TopicTaskExit, TopicTaskDelete}
	if got := h.ev.topics(); !slices.Equal(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
}

// TestOutputReaderLate opens the outputs' readers only once the process
// ended, as they are when containerd's goroutine that opens them runs
// late: what the process wrote still arrives, whole, and the output ends,
// also when it wrote nothing.
func TestOutputReaderLate(t *testing.T) {
	for _, tc := range []struct {
		name             string
		exec             bool
		args             []string
		status           uint32
		wantOut, wantErr string
	}{
		{"init writes", false, []string{"echo", "hello", "box"}, 0, "hello box\n", "err\n"},
		{"init writes nothing", false, []string{"exit", "5"}, 5, "", ""},
		{"exec writes", true, []string{"echo", "from", "exec"}, 0, "from exec\n", "err\n"},
		{"exec writes nothing", true, []string{"exit", "5"}, 5, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			s := h.fifos("late", false)
			execID := ""
			if tc.exec {
				execID = "e1"
				if err := h.create(h.streams("init", false), "sleep"); err != nil {
					t.Fatal(err)
				}
				if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
					t.Fatal(err)
				}
				spec, _ := json.Marshal(specs.Process{Args: tc.args, Cwd: "/"})
				if _, err := h.svc.Exec(h.ctx, &taskapi.ExecProcessRequest{ID: testID, ExecID: execID, Stdout: s.stdout, Stderr: s.stderr,
					Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}}); err != nil {
					t.Fatal(err)
				}
			} else if err := h.create(s, tc.args...); err != nil {
				t.Fatal(err)
			}
			if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID, ExecID: execID}); err != nil {
				t.Fatal(err)
			}
			// The fake box runs the program at once: give its stream time
			// to end and the shim time to close what it would close.
			time.Sleep(300 * time.Millisecond)
			s.out, s.errOut = h.collect(s.stdout), h.collect(s.stderr)
			if status := h.wait(execID); status != tc.status {
				t.Errorf("exit status %d, want %d", status, tc.status)
			}
			if got := s.out.text(t); got != tc.wantOut {
				t.Errorf("stdout %q, want %q", got, tc.wantOut)
			}
			if got := s.errOut.text(t); got != tc.wantErr {
				t.Errorf("stderr %q, want %q", got, tc.wantErr)
			}
		})
	}
}

// TestOutputNoReader: with no reader, an output's writes fail and its
// close returns once the wait for one is over.
func TestOutputNoReader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	o, err := openOutput(path, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.Write([]byte("lost")); err == nil {
		t.Error("a write with no reader succeeded")
	}
	done := make(chan error, 1)
	go func() { done <- o.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close still waits for a reader after its wait ended")
	}
	if _, err := openOutput(filepath.Join(t.TempDir(), "missing"), time.Second); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an output that is not there: %v, want not exist", err)
	}
}

func TestExitStatusPassesThrough(t *testing.T) {
	for _, code := range []string{"0", "3", "127", "255"} {
		t.Run(code, func(t *testing.T) {
			h := newHarness(t)
			if got := h.run(h.streams("init", false), "exit", code); strconv.FormatUint(uint64(got), 10) != code {
				t.Errorf("exit status %d, want %s", got, code)
			}
		})
	}
}

func TestStdinThenCloseIO(t *testing.T) {
	cases := []struct {
		name string
		// closeFirst closes the fifo before CloseIO; ctr asks for the
		// close first, and closes its end once CloseIO answered.
		closeFirst bool
		// writerLate opens the client's end only after the start's
		// request ended (its context cancelled).
		writerLate bool
	}{{"fifo closed first", true, false}, {"CloseIO first", false, false}, {"writer opened after the start", true, true}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			s := h.streams("init", !c.writerLate)
			if c.writerLate {
				s.stdin = filepath.Join(h.dir, "init-stdin")
				if err := syscall.Mkfifo(s.stdin, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if err := h.create(s, "cat"); err != nil {
				t.Fatal(err)
			}
			startCtx, cancel := context.WithCancel(h.ctx)
			_, err := h.svc.Start(startCtx, &taskapi.StartRequest{ID: testID})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			if c.writerLate {
				time.Sleep(100 * time.Millisecond)
				f, err := fifo.OpenFifo(h.ctx, s.stdin, syscall.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				s.in = f
			}
			input := strings.Repeat("line of input\n", 2000)
			if _, err := s.in.Write([]byte(input)); err != nil {
				t.Fatal(err)
			}
			if c.closeFirst {
				_ = s.in.Close()
			}
			began := time.Now()
			if _, err := h.svc.CloseIO(h.ctx, &taskapi.CloseIORequest{ID: testID, Stdin: true}); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(began); took > stdinDrainWait/2 {
				t.Errorf("CloseIO took %v", took)
			}
			_ = s.in.Close()
			if status := h.wait(""); status != 0 {
				t.Errorf("exit status %d", status)
			}
			if got := s.out.text(t); got != input {
				t.Errorf("cat gave %d bytes back of %d", len(got), len(input))
			}
		})
	}
}

func TestKillAndState(t *testing.T) {
	h := newHarness(t)
	if err := h.create(h.streams("init", false), "sleep"); err != nil {
		t.Fatal(err)
	}
	h.state("", task.Status_CREATED)
	start, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID})
	if err != nil {
		t.Fatal(err)
	}
	if start.Pid == 0 {
		t.Error("Start returned pid 0")
	}
	h.state("", task.Status_RUNNING)
	if _, err := h.svc.Pause(h.ctx, &taskapi.PauseRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	h.state("", task.Status_PAUSED)
	// Pids of a paused task does not ask the box, which would unpause it.
	if pids, err := h.svc.Pids(h.ctx, &taskapi.PidsRequest{ID: testID}); err != nil || len(pids.Processes) != 1 || pids.Processes[0].Pid != start.Pid {
		t.Errorf("Pids of the paused task: %v, %v", pids, err)
	}
	if bx, _ := h.boxes.Get(h.ctx, h.svc.Box()); bx.State != box.StatePaused {
		t.Errorf("box %s after Pause and Pids", bx.State)
	}
	if _, err := h.svc.Resume(h.ctx, &taskapi.ResumeRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	h.state("", task.Status_RUNNING)
	pids, err := h.svc.Pids(h.ctx, &taskapi.PidsRequest{ID: testID})
	if err != nil || len(pids.Processes) != 1 || pids.Processes[0].Pid != start.Pid {
		t.Errorf("Pids: %v, %v; want [%d]", pids, err, start.Pid)
	}
	if _, err := h.svc.Delete(h.ctx, &taskapi.DeleteRequest{ID: testID}); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Delete of a running task: %v, want failed precondition", err)
	}
	if _, err := h.svc.Kill(h.ctx, &taskapi.KillRequest{ID: testID, Signal: 15}); err != nil {
		t.Fatal(err)
	}
	if status := h.wait(""); status != 128+15 {
		t.Errorf("exit status %d after SIGTERM, want 143", status)
	}
	h.state("", task.Status_STOPPED)
	if _, err := h.svc.Kill(h.ctx, &taskapi.KillRequest{ID: testID, Signal: 9}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Kill of an exited task: %v, want not found", err)
	}
	want := []string{TopicTaskCreate, TopicTaskStart, TopicTaskPaused, TopicTaskResumed, TopicTaskExit}
	if got := h.ev.topics(); !slices.Equal(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
}

func (h *harness) state(execID string, want task.Status) {
	h.t.Helper()
	st, err := h.svc.State(h.ctx, &taskapi.StateRequest{ID: testID, ExecID: execID})
	if err != nil {
		h.t.Fatal(err)
	}
	if st.Status != want {
		h.t.Errorf("state of %q: %v, want %v", execID, st.Status, want)
	}
}

func TestExec(t *testing.T) {
	h := newHarness(t)
	if err := h.create(h.streams("init", false), "sleep"); err != nil {
		t.Fatal(err)
	}
	n := 0
	exec := func(id string, terminal bool, args ...string) (*streams, error) {
		n++
		s := h.streams(id+strconv.Itoa(n), false)
		spec, _ := json.Marshal(specs.Process{Args: args, Cwd: "/"})
		_, err := h.svc.Exec(h.ctx, &taskapi.ExecProcessRequest{ID: testID, ExecID: id, Terminal: terminal,
			Stdout: s.stdout, Stderr: s.stderr, Spec: &anypb.Any{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: spec}})
		return s, err
	}
	if _, err := exec("early", false, "echo", "x"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Exec before the task runs: %v, want failed precondition", err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	s, err := exec("e1", true, "echo", "from", "exec")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exec("e1", false, "echo"); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("a second exec e1: %v, want already exists", err)
	}
	h.state("e1", task.Status_CREATED)
	if _, err := h.svc.ResizePty(h.ctx, &taskapi.ResizePtyRequest{ID: testID, ExecID: "e1", Width: 100, Height: 30}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID, ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	if status := h.wait("e1"); status != 0 {
		t.Errorf("exec's status %d", status)
	}
	if got := s.out.text(t); got != "from exec\n" {
		t.Errorf("exec's output %q", got)
	}
	p, err := h.boxes.proc(h.svc.Box(), ExecPrefix+"e1")
	if err != nil || !p.spec.Terminal || p.rows != 30 || p.cols != 100 {
		t.Errorf("exec's kept process %+v, %v: want a 30x100 terminal", p, err)
	}
	h.state("e1", task.Status_STOPPED)
	if _, err := h.svc.Delete(h.ctx, &taskapi.DeleteRequest{ID: testID, ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.boxes.proc(h.svc.Box(), ExecPrefix+"e1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("the deleted exec is still kept in the box: %v", err)
	}
	if _, err := h.svc.State(h.ctx, &taskapi.StateRequest{ID: testID, ExecID: "e1"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("State of a deleted exec: %v, want not found", err)
	}
	// An exec that runs when init exits is killed with it.
	if _, err := exec("e2", false, "sleep"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID, ExecID: "e2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Kill(h.ctx, &taskapi.KillRequest{ID: testID, Signal: 9}); err != nil {
		t.Fatal(err)
	}
	if status := h.wait("e2"); status != 137 {
		t.Errorf("exec's status after the task died: %d, want 137", status)
	}
	want := []string{TopicTaskCreate, TopicTaskStart, TopicTaskExecAdded, TopicTaskExecStarted, TopicTaskExit,
		TopicTaskExecAdded, TopicTaskExecStarted}
	if got := h.ev.topics(); !slices.Equal(got[:len(want)], want) {
		t.Errorf("events %v, want them to begin %v", got, want)
	}
}

func TestCreateRefuses(t *testing.T) {
	cases := []struct {
		name    string
		mounts  []*types.Mount
		bundle  func(h *harness) string
		daemon  error
		want    error
		message string
	}{
		{name: "overlay", mounts: []*types.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a"}}},
			want: errdefs.ErrInvalidArgument, message: "--snapshotter boxd"},
		{name: "two mounts", mounts: []*types.Mount{{Type: "ext4"}, {Type: "ext4"}},
			want: errdefs.ErrInvalidArgument, message: "2 mounts"},
		{name: "no config.json", bundle: func(h *harness) string { return h.dir },
			want: errdefs.ErrInvalidArgument, message: "config.json"},
		{name: "no args", bundle: func(h *harness) string { return h.bundle() },
			want: errdefs.ErrInvalidArgument, message: "no arguments"},
		{name: "no daemon", daemon: &daemon.NotRunningError{Root: "/srv/boxd"},
			want: errdefs.ErrUnavailable, message: "boxd daemon is not running: nothing answers on /srv/boxd/boxd.sock"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			h.boxes.createErr = c.daemon
			bundle := h.bundle("echo")
			if c.bundle != nil {
				bundle = c.bundle(h)
			}
			mounts := h.rootfs()
			if c.mounts != nil {
				mounts = c.mounts
			}
			_, err := h.svc.Create(h.ctx, &taskapi.CreateTaskRequest{ID: testID, Bundle: bundle, Rootfs: mounts})
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.message) {
				t.Fatalf("Create: %v, want %v saying %q", err, c.want, c.message)
			}
			if strings.Count(strings.TrimSuffix(err.Error(), "."), ". ") > 0 {
				t.Errorf("error of more than one sentence: %v", err)
			}
			if len(h.boxes.boxes) != 0 {
				t.Errorf("boxes left behind: %v", h.boxes.boxes)
			}
			if _, err := os.Stat(filepath.Join(bundle, BoxFile)); err == nil {
				t.Errorf("the bundle names a box")
			}
		})
	}
}

func TestStreamBreaks(t *testing.T) {
	t.Run("detached", func(t *testing.T) {
		h := newHarness(t)
		s := h.streams("init", false)
		if status := h.run(s, "detach"); status != 0 {
			t.Errorf("exit status %d after a re-attach", status)
		}
		if got := s.out.text(t); got != "again\n" {
			t.Errorf("output %q", got)
		}
	})
	t.Run("no such program", func(t *testing.T) {
		h := newHarness(t)
		if err := h.create(h.streams("init", false), "missing"); err != nil {
			t.Fatal(err)
		}
		_, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID})
		if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "executable file not found") {
			t.Errorf("Start: %v, want the box's reason", err)
		}
		if status := h.wait(""); status != 255 {
			t.Errorf("exit status %d, want 255", status)
		}
	})
	t.Run("guest crash", func(t *testing.T) {
		h := newHarness(t)
		s := h.streams("init", false)
		if status := h.run(s, "crash"); status == 0 {
			t.Error("a task whose guest crashed exited 0")
		}
		if !strings.Contains(h.logs.String(), "guest kernel panic") {
			t.Errorf("the log does not say why: %s", h.logs.String())
		}
	})
}

func TestCheckpointRestore(t *testing.T) {
	h := newHarness(t)
	if err := h.create(h.streams("init", false), "sleep"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	old := h.svc.Box()
	dir := filepath.Join(h.dir, "checkpoint")
	// containerd pauses the task around a checkpoint.
	if _, err := h.svc.Pause(h.ctx, &taskapi.PauseRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Checkpoint(h.ctx, &taskapi.CheckpointTaskRequest{ID: testID, Path: dir}); err != nil {
		t.Fatal(err)
	}
	if bx, _ := h.boxes.Get(h.ctx, old); bx.State != box.StatePaused {
		t.Errorf("after the checkpoint of a paused task its box is %s", bx.State)
	}
	if _, err := h.svc.Resume(h.ctx, &taskapi.ResumeRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	ck, err := ReadCheckpoint(dir)
	if err != nil || ck.Box != old || len(h.boxes.snaps) != 1 || ck.Snapshot != h.boxes.snaps[0] {
		t.Fatalf("checkpoint %+v, %v; snapshots %v", ck, err, h.boxes.snaps)
	}
	if _, err := h.svc.Kill(h.ctx, &taskapi.KillRequest{ID: testID, Signal: 9}); err != nil {
		t.Fatal(err)
	}
	h.wait("")
	if _, err := h.svc.Delete(h.ctx, &taskapi.DeleteRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	// The box holds the checkpoint: kept, stopped, not named by the bundle.
	if bx, err := h.boxes.Get(h.ctx, old); err != nil || bx.State != box.StateStopped {
		t.Errorf("the checkpointed box after Delete: %+v, %v; want it stopped", bx, err)
	}
	if _, err := os.Stat(filepath.Join(h.dir, "bundle", BoxFile)); err == nil {
		t.Error("the bundle still names the kept box: the delete action would remove it")
	}

	// A new shim restores the same container from the checkpoint.
	r := newHarness(t)
	r.boxes = h.boxes
	r.svc = New(Config{Namespace: testNS, ID: testID, Boxes: h.boxes, Events: r.ev, Log: r.svc.log})
	s := r.streams("init", false)
	if _, err := r.svc.Create(r.ctx, &taskapi.CreateTaskRequest{ID: testID, Bundle: r.bundle("sleep"), Checkpoint: dir, Stdout: s.stdout, Stderr: s.stderr}); err != nil {
		t.Fatal(err)
	}
	req := h.boxes.requests[len(h.boxes.requests)-1]
	if req.From != ck.Snapshot || req.Name == old || req.Labels[LabelID] != testID {
		t.Errorf("restore's create request %+v", req)
	}
	if _, err := r.svc.Start(r.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		t.Fatalf("Start of the restored task (attach to the checkpoint's process): %v", err)
	}
	r.state("", task.Status_RUNNING)
	if _, err := r.svc.Kill(r.ctx, &taskapi.KillRequest{ID: testID, Signal: 15}); err != nil {
		t.Fatal(err)
	}
	if status := r.wait(""); status != 143 {
		t.Errorf("restored task's status %d", status)
	}
}

func TestShutdownWaitsForDelete(t *testing.T) {
	h := newHarness(t)
	exited := make(chan struct{}, 1)
	h.svc.cfg.Exit = func() { exited <- struct{}{} }
	h.run(h.streams("init", false), "exit", "0")
	if _, err := h.svc.Shutdown(h.ctx, &taskapi.ShutdownRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
		t.Fatal("the shim went with its task not deleted")
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := h.svc.Delete(h.ctx, &taskapi.DeleteRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Shutdown(h.ctx, &taskapi.ShutdownRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exited:
	case <-time.After(time.Second):
		t.Fatal("Shutdown after Delete did not let the shim go")
	}
}

// Killing a paused task reaches its process: the daemon unpauses the box
// for the call, and the task says so.
func TestKillPausedTask(t *testing.T) {
	h := newHarness(t)
	if err := h.create(h.streams("init", false), "sleep"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Pause(h.ctx, &taskapi.PauseRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Kill(h.ctx, &taskapi.KillRequest{ID: testID, Signal: 9}); err != nil {
		t.Fatal(err)
	}
	if status := h.wait(""); status != 137 {
		t.Errorf("exit status %d, want 137", status)
	}
	want := []string{TopicTaskCreate, TopicTaskStart, TopicTaskPaused, TopicTaskResumed, TopicTaskExit}
	if got := h.ev.topics(); !slices.Equal(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
}
