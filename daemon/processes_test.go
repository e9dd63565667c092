package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

// The fake manager has no kept processes: its box's agent does not keep
// them.
func (m *fakeManager) Process(_ context.Context, name string, spec agent.ProcessSpec, _ agent.ProcessIO) (int, error) {
	return -1, m.noProcesses(name, "process %s %s", name, spec.ID)
}

func (m *fakeManager) Processes(_ context.Context, name string) ([]agent.ProcessInfo, error) {
	return nil, m.noProcesses(name, "processes %s", name)
}

func (m *fakeManager) SignalProcess(_ context.Context, name, id string, sig int) error {
	return m.noProcesses(name, "signal %s %s %d", name, id, sig)
}

func (m *fakeManager) ResizeProcess(_ context.Context, name, id string, rows, cols int) error {
	return m.noProcesses(name, "resize %s %s %dx%d", name, id, rows, cols)
}

func (m *fakeManager) CloseProcessStdin(_ context.Context, name, id string) error {
	return m.noProcesses(name, "close-stdin %s %s", name, id)
}

func (m *fakeManager) ForgetProcess(_ context.Context, name, id string) error {
	return m.noProcesses(name, "forget %s %s", name, id)
}

// noProcesses records a call on box name's kept processes and refuses it.
func (m *fakeManager) noProcesses(name, format string, args ...any) error {
	if err := m.record(format, args...); err != nil {
		return err
	}
	if _, err := m.lookup(name); err != nil {
		return err
	}
	return fmt.Errorf("the fake box keeps no processes: %w", errdefs.ErrNotImplemented)
}

// keepAgent is the fake manager with a box dev whose kept processes run
// in a real agent (agent.Serve) on this host; relink breaks the link to it
// and makes a new one, as a hibernated box's resume does.
type keepAgent struct {
	*fakeManager
	cfg *agent.ServerConfig
	t   *testing.T

	mu sync.Mutex
	c  *agent.Client
}

func newKeepAgent(t *testing.T) *keepAgent {
	k := &keepAgent{fakeManager: newFakeManager(box.Box{Name: "dev", State: box.StateRunning}), cfg: &agent.ServerConfig{}, t: t}
	k.relink()
	return k
}

// relink closes the link to the agent, if any, and makes a new one.
func (k *keepAgent) relink() {
	c := serveAgent(k.t, k.cfg)
	k.mu.Lock()
	old := k.c
	k.c = c
	k.mu.Unlock()
	if old != nil {
		old.Close()
	}
}

// client returns the agent client of box name.
func (k *keepAgent) client(name string) (*agent.Client, error) {
	if _, err := k.lookup(name); err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.c, nil
}

func (k *keepAgent) Process(ctx context.Context, name string, spec agent.ProcessSpec, stdio agent.ProcessIO) (int, error) {
	c, err := k.client(name)
	if err != nil {
		return -1, err
	}
	return c.Process(ctx, spec, stdio)
}

func (k *keepAgent) Processes(ctx context.Context, name string) ([]agent.ProcessInfo, error) {
	c, err := k.client(name)
	if err != nil {
		return nil, err
	}
	return c.Processes(ctx)
}

func (k *keepAgent) SignalProcess(ctx context.Context, name, id string, sig int) error {
	c, err := k.client(name)
	if err != nil {
		return err
	}
	return c.SignalProcess(ctx, id, sig)
}

func (k *keepAgent) ResizeProcess(ctx context.Context, name, id string, rows, cols int) error {
	c, err := k.client(name)
	if err != nil {
		return err
	}
	return c.ResizeProcess(ctx, id, rows, cols)
}

func (k *keepAgent) CloseProcessStdin(ctx context.Context, name, id string) error {
	c, err := k.client(name)
	if err != nil {
		return err
	}
	return c.CloseProcessStdin(ctx, id)
}

func (k *keepAgent) ForgetProcess(ctx context.Context, name, id string) error {
	c, err := k.client(name)
	if err != nil {
		return err
	}
	return c.ForgetProcess(ctx, id)
}

// checkProcesses checks the kept processes of box name through c: output,
// exit status, the refusals, the requests on one, and a process that runs
// on while detach breaks the daemon's link to the box, and whose output
// and exit status a later attach gets.
func checkProcesses(t *testing.T, c *Client, name string, detach func(t *testing.T)) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	t.Run("output and exit status", func(t *testing.T) {
		var stdout, stderr bytes.Buffer
		code, err := c.ProcessStream(ctx, name, agent.ProcessSpec{
			ID: "hello", Args: []string{"sh", "-c", "echo hello; echo warn >&2; exit 3"}, Env: []string{"PATH=" + agent.DefaultPath},
		}, agent.ProcessIO{Stdout: &stdout, Stderr: &stderr})
		if err != nil || code != 3 || stdout.String() != "hello\n" || stderr.String() != "warn\n" {
			t.Fatalf("exit %d, %v, stdout %q, stderr %q", code, err, stdout.String(), stderr.String())
		}
		list, err := c.Processes(ctx, name)
		if err != nil || len(list) != 1 || list[0].ID != "hello" || list[0].Running || list[0].ExitCode != 3 {
			t.Fatalf("Processes = %+v, %v", list, err)
		}
		if err := c.ForgetProcess(ctx, name, "hello"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		for _, tc := range []struct {
			what string
			err  error
			want error
		}{
			{"attach to an unknown ID", streamErr(ctx, c, name, agent.ProcessSpec{ID: "nope", Attach: true}), errdefs.ErrNotFound},
			{"a program not found", streamErr(ctx, c, name, agent.ProcessSpec{ID: "x", Args: []string{"boxd-no-such-program"}}), errdefs.ErrNotFound},
			{"no ID", streamErr(ctx, c, name, agent.ProcessSpec{Args: []string{"true"}}), errdefs.ErrInvalidArgument},
			{"an unknown box", streamErr(ctx, c, "nope", agent.ProcessSpec{ID: "x", Args: []string{"true"}}), errdefs.ErrNotFound},
			{"signal to an unknown ID", c.SignalProcess(ctx, name, "nope", 15), errdefs.ErrNotFound},
			{"resize of an unknown ID", c.ResizeProcess(ctx, name, "nope", 10, 10), errdefs.ErrNotFound},
			{"close-stdin of an unknown ID", c.CloseProcessStdin(ctx, name, "nope"), errdefs.ErrNotFound},
			{"forget of an unknown ID", c.ForgetProcess(ctx, name, "nope"), errdefs.ErrNotFound},
		} {
			if !errors.Is(tc.err, tc.want) || errors.Is(tc.err, agent.ErrDetached) {
				t.Errorf("%s: %v, want %v", tc.what, tc.err, tc.want)
			}
		}
	})

	t.Run("signal", func(t *testing.T) {
		res := make(chan error, 1)
		go func() {
			code, err := c.ProcessStream(ctx, name, agent.ProcessSpec{ID: "sleep", Args: []string{"sleep", "100"}, Env: []string{"PATH=" + agent.DefaultPath}}, agent.ProcessIO{})
			if err == nil && code != 128+15 {
				err = fmt.Errorf("exit %d, want 143", code)
			}
			res <- err
		}()
		waitProcess(t, c, name, "sleep")
		if err := c.SignalProcess(ctx, name, "sleep", 15); err != nil {
			t.Fatal(err)
		}
		if err := <-res; err != nil {
			t.Fatal(err)
		}
		if err := c.ForgetProcess(ctx, name, "sleep"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("detach and attach again", func(t *testing.T) {
		// The process writes its first half, then waits for a line: the
		// link breaks while it waits, and a new attach sends the line
		// and gets the second half and the exit status.
		in, inW := io.Pipe()
		defer inW.Close()
		first := &testutil.LockedBuffer{}
		res := make(chan error, 1)
		go func() {
			_, err := c.ProcessStream(ctx, name, agent.ProcessSpec{
				ID: "halves", Args: []string{"sh", "-c", "seq 1 5000; read x; echo \"got $x\"; seq 5001 10000; exit 5"}, Env: []string{"PATH=" + agent.DefaultPath},
			}, agent.ProcessIO{Stdin: in, Stdout: first})
			res <- err
		}()
		first.WaitFor(t, "\n5000\n", time.Minute)
		detach(t)
		select {
		case err := <-res:
			if !errors.Is(err, agent.ErrDetached) || !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("ProcessStream = %v, want detached", err)
			}
		case <-time.After(2 * time.Minute):
			t.Fatal("ProcessStream did not return when its box's link broke")
		}
		var rest bytes.Buffer
		code, err := c.ProcessStream(ctx, name, agent.ProcessSpec{ID: "halves", Attach: true}, agent.ProcessIO{Stdin: strings.NewReader("go\n"), Stdout: &rest})
		if err != nil || code != 5 {
			t.Fatalf("attach: exit %d, %v", code, err)
		}
		var want strings.Builder
		for i := 1; i <= 10000; i++ {
			if i == 5001 {
				want.WriteString("got go\n")
			}
			fmt.Fprintf(&want, "%d\n", i)
		}
		if got := first.String() + rest.String(); got != want.String() {
			t.Errorf("got %d bytes (%d + %d), want %d, identical", len(got), len(first.String()), rest.Len(), want.Len())
		}
		if err := c.ForgetProcess(ctx, name, "halves"); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("client goes away", func(t *testing.T) {
		cctx, ccancel := context.WithCancel(ctx)
		out := &testutil.LockedBuffer{}
		res := make(chan error, 1)
		go func() {
			_, err := c.ProcessStream(cctx, name, agent.ProcessSpec{ID: "cat", Args: []string{"cat"}, Env: []string{"PATH=" + agent.DefaultPath}}, agent.ProcessIO{Stdin: strings.NewReader("one\n"), Stdout: out})
			res <- err
		}()
		out.WaitFor(t, "one\n", time.Minute)
		ccancel()
		if err := <-res; !errors.Is(err, agent.ErrDetached) {
			t.Fatalf("ProcessStream after its context ended = %v, want detached", err)
		}
		waitProcess(t, c, name, "cat")
		var rest bytes.Buffer
		attached := make(chan struct{})
		go func() {
			code, err := c.ProcessStream(ctx, name, agent.ProcessSpec{ID: "cat", Attach: true}, agent.ProcessIO{Stdin: strings.NewReader("two\n"), Stdout: &rest})
			if err == nil && code != 0 {
				err = fmt.Errorf("exit %d", code)
			}
			res <- err
			close(attached)
		}()
		time.Sleep(200 * time.Millisecond) // the attach's input is on its way
		if err := c.CloseProcessStdin(ctx, name, "cat"); err != nil {
			t.Fatal(err)
		}
		if err := <-res; err != nil {
			t.Fatal(err)
		}
		<-attached
		if got := out.String() + rest.String(); got != "one\ntwo\n" {
			t.Errorf("output %q, want one, two", got)
		}
		if err := c.ForgetProcess(ctx, name, "cat"); err != nil {
			t.Fatal(err)
		}
	})
}

// streamErr is the error of a ProcessStream of spec in box name.
func streamErr(ctx context.Context, c *Client, name string, spec agent.ProcessSpec) error {
	_, err := c.ProcessStream(ctx, name, spec, agent.ProcessIO{})
	return err
}

// waitProcess waits until kept process id of box name runs.
func waitProcess(t *testing.T, c *Client, name, id string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		list, err := c.Processes(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range list {
			if p.ID == id && p.Running {
				return
			}
		}
	}
	t.Fatalf("process %q of box %s is not running", id, name)
}

// TestProcesses runs the kept processes against a real agent on this
// host; a detach breaks the link and makes a new one.
func TestProcesses(t *testing.T) {
	k := newKeepAgent(t)
	srv := newTestServer(k, &fakeGraph{})
	checkProcesses(t, serve(t, srv), "dev", func(*testing.T) { k.relink() })
}

// TestProcessesBox runs the kept processes against a real box under QEMU;
// a detach hibernates the box, and the next use resumes it.
func TestProcessesBox(t *testing.T) {
	boxtest.Skip(t)
	mgr, g := boxtest.NewManager(t)
	srv := newTestServer(mgr, g)
	c := serve(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := c.Create(ctx, CreateRequest{Name: "dev", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{testKey}}); err != nil {
		t.Fatal(err)
	}
	checkProcesses(t, c, "dev", func(t *testing.T) {
		if bx, err := c.Hibernate(ctx, "dev"); err != nil || bx.State != box.StateHibernated {
			t.Fatalf("hibernate: %+v, %v", bx, err)
		}
	})
}

// TestProcessRoutes checks the routes' answers without a box that keeps
// processes: an owner's request is refused, as an exec is.
func TestProcessRoutes(t *testing.T) {
	m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
	srv := newTestServer(m, &fakeGraph{})
	c := serve(t, srv)
	ctx := context.Background()
	if _, err := c.Processes(ctx, "dev"); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("Processes = %v, want not supported", err)
	}
	if err := c.SignalProcess(ctx, "dev", "p", 9); !errors.Is(err, errdefs.ErrNotImplemented) || m.lastCall() != "signal dev p 9" {
		t.Errorf("SignalProcess = %v, call %q", err, m.lastCall())
	}
	if err := c.ResizeProcess(ctx, "dev", "p", 30, 90); !errors.Is(err, errdefs.ErrNotImplemented) || m.lastCall() != "resize dev p 30x90" {
		t.Errorf("ResizeProcess = %v, call %q", err, m.lastCall())
	}
	if err := c.CloseProcessStdin(ctx, "dev", "p"); !errors.Is(err, errdefs.ErrNotImplemented) || m.lastCall() != "close-stdin dev p" {
		t.Errorf("CloseProcessStdin = %v, call %q", err, m.lastCall())
	}
	if err := c.ForgetProcess(ctx, "dev", "p"); !errors.Is(err, errdefs.ErrNotImplemented) || m.lastCall() != "forget dev p" {
		t.Errorf("ForgetProcess = %v, call %q", err, m.lastCall())
	}
	if err := c.ForgetProcess(ctx, "nope", "p"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("ForgetProcess in an unknown box = %v, want not found", err)
	}
}
