package shim

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/fifo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

const (
	testNS = "default"
	testID = "web-1"
)

// harness is one shim's task service on fake boxes.
type harness struct {
	t     *testing.T
	dir   string
	boxes *fakeBoxes
	ev    *recorder
	logs  *testutil.LockedBuffer
	svc   *Service
	ctx   context.Context
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{t: t, dir: t.TempDir(), boxes: newFakeBoxes(), ev: &recorder{}, logs: &testutil.LockedBuffer{}}
	h.svc = New(Config{Namespace: testNS, ID: testID, Boxes: h.boxes, Events: h.ev,
		Log: slog.New(slog.NewTextHandler(h.logs, nil))})
	t.Cleanup(h.svc.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	h.ctx = ctx
	return h
}

// bundle writes a bundle whose process is args.
func (h *harness) bundle(args ...string) string {
	h.t.Helper()
	dir := filepath.Join(h.dir, "bundle")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		h.t.Fatal(err)
	}
	spec := specs.Spec{Version: specs.Version, Hostname: "web", Process: &specs.Process{Args: args, Env: []string{"PATH=/bin"}, Cwd: "/"}}
	data, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o644); err != nil {
		h.t.Fatal(err)
	}
	return dir
}

// rootfs is a mount as boxd's snapshotter hands them out.
func (h *harness) rootfs() []*types.Mount {
	return []*types.Mount{{Type: "ext4", Source: filepath.Join(h.dir, "root", "containerd", "images", "7"), Options: []string{"loop"}}}
}

// streams are a process's fifos as containerd makes them, with their
// reading ends open.
type streams struct {
	stdin, stdout, stderr string
	in                    io.WriteCloser
	out, errOut           *collector
}

func (h *harness) streams(name string, stdin bool) *streams {
	h.t.Helper()
	s := h.fifos(name, stdin)
	s.out, s.errOut = h.collect(s.stdout), h.collect(s.stderr)
	return s
}

// fifos makes a process's fifos with no output read yet: their readers
// come with collect.
func (h *harness) fifos(name string, stdin bool) *streams {
	h.t.Helper()
	s := &streams{stdout: filepath.Join(h.dir, name+"-stdout"), stderr: filepath.Join(h.dir, name+"-stderr")}
	if stdin {
		s.stdin = filepath.Join(h.dir, name+"-stdin")
	}
	for _, p := range []string{s.stdin, s.stdout, s.stderr} {
		if p != "" {
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				h.t.Fatal(err)
			}
		}
	}
	if stdin {
		f, err := fifo.OpenFifo(h.ctx, s.stdin, syscall.O_WRONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			h.t.Fatal(err)
		}
		s.in = f
		h.t.Cleanup(func() { _ = f.Close() })
	}
	return s
}

// collector reads a fifo to its end.
type collector struct {
	done chan struct{}
	buf  bytes.Buffer
}

func (h *harness) collect(path string) *collector {
	h.t.Helper()
	f, err := fifo.OpenFifo(h.ctx, path, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		h.t.Fatal(err)
	}
	c := &collector{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		_, _ = io.Copy(&c.buf, f)
		_ = f.Close()
	}()
	return c
}

// text waits for the end of the output and returns it.
func (c *collector) text(t *testing.T) string {
	t.Helper()
	select {
	case <-c.done:
		return c.buf.String()
	case <-time.After(10 * time.Second):
		t.Fatal("the output never ended: the shim kept its end of the fifo open")
		return ""
	}
}

// create creates the task running args with streams s.
func (h *harness) create(s *streams, args ...string) error {
	_, err := h.svc.Create(h.ctx, &taskapi.CreateTaskRequest{ID: testID, Bundle: h.bundle(args...), Rootfs: h.rootfs(),
		Stdin: s.stdin, Stdout: s.stdout, Stderr: s.stderr})
	return err
}

// run creates and starts the task, and returns its exit status once Wait
// answers.
func (h *harness) run(s *streams, args ...string) uint32 {
	h.t.Helper()
	if err := h.create(s, args...); err != nil {
		h.t.Fatalf("Create: %v", err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		h.t.Fatalf("Start: %v", err)
	}
	return h.wait("")
}

func (h *harness) wait(execID string) uint32 {
	h.t.Helper()
	w, err := h.svc.Wait(h.ctx, &taskapi.WaitRequest{ID: testID, ExecID: execID})
	if err != nil {
		h.t.Fatalf("Wait %q: %v", execID, err)
	}
	return w.ExitStatus
}
