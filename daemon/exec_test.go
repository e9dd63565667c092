package daemon

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

// hostAgent is the fake manager with a box dev whose commands run through
// a real agent (agent.Serve) on this host, over a socket pair: the whole
// exec path, pty included, but QEMU.
type hostAgent struct {
	*fakeManager
	c *agent.Client
}

func (h hostAgent) Exec(ctx context.Context, name string, cmd agent.Command) (int, error) {
	if _, err := h.lookup(name); err != nil {
		return 0, err
	}
	return h.c.Run(ctx, cmd)
}

func newHostAgent(t *testing.T) hostAgent {
	t.Helper()
	return hostAgent{newFakeManager(box.Box{Name: "dev", State: box.StateRunning}), serveAgent(t, nil)}
}

// serveAgent runs a real agent (agent.Serve with cfg) on one end of a
// socket pair and returns its client on the other; both end with t.
func serveAgent(t *testing.T, cfg *agent.ServerConfig) *agent.Client {
	t.Helper()
	host, guest, err := testutil.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- agent.Serve(ctx, guest, cfg) }()
	hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
	defer hcancel()
	c, err := agent.NewClient(hctx, host)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		cancel()
		<-served
	})
	return c
}

type execOutcome struct {
	code int
	err  error
}

// checkExecStream checks a streaming exec through c in box name: output as
// it is written, input, exit statuses, a pty and its window size, the
// refusals, and the use counted while it lasts.
func checkExecStream(t *testing.T, srv *Server, c *Client, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	t.Run("output before the command ends", func(t *testing.T) {
		// The command cannot end before its input does, and its input
		// is given only once its first line has arrived.
		inR, inW := io.Pipe()
		stdout, stderr := &testutil.LockedBuffer{}, &testutil.LockedBuffer{}
		res := make(chan execOutcome, 1)
		go func() {
			code, err := c.ExecStream(ctx, name, ExecOptions{
				Args:   []string{"sh", "-c", `echo first; echo warn >&2; read line; echo "got $line"; exit 3`},
				Stdin:  inR,
				Stdout: stdout, Stderr: stderr,
			})
			res <- execOutcome{code, err}
		}()
		stdout.WaitFor(t, "first\n", time.Minute)
		if n := srv.activeCount(name); n != 1 {
			t.Errorf("box %s has %d uses in progress during the exec, want 1", name, n)
		}
		select {
		case r := <-res:
			t.Fatalf("the command ended before its input: %+v", r)
		default:
		}
		if _, err := io.WriteString(inW, "hello\n"); err != nil {
			t.Fatal(err)
		}
		inW.Close()
		r := <-res
		if r.err != nil || r.code != 3 {
			t.Fatalf("exit %d, %v; want 3", r.code, r.err)
		}
		if got := stdout.String(); got != "first\ngot hello\n" {
			t.Errorf("stdout %q", got)
		}
		if got := stderr.String(); got != "warn\n" {
			t.Errorf("stderr %q", got)
		}
		if n := srv.activeCount(name); n != 0 {
			t.Errorf("box %s has %d uses in progress after the exec", name, n)
		}
	})

	t.Run("input", func(t *testing.T) {
		// More than a frame, with every byte value.
		in := bytes.Repeat([]byte{0, 1, 2, 'x', '\n', 0xff}, 3*MaxFrame/6+7)
		var out bytes.Buffer
		code, err := c.ExecStream(ctx, name, ExecOptions{Args: []string{"cat"}, Stdin: bytes.NewReader(in), Stdout: &out})
		if err != nil || code != 0 || !bytes.Equal(out.Bytes(), in) {
			t.Fatalf("cat: exit %d, %v, %d bytes back of %d", code, err, out.Len(), len(in))
		}
		// No input: end of file at once.
		out.Reset()
		code, err = c.ExecStream(ctx, name, ExecOptions{Args: []string{"cat"}, Stdout: &out})
		if err != nil || code != 0 || out.Len() != 0 {
			t.Fatalf("cat without input: exit %d, %v, %q", code, err, out.String())
		}
	})

	t.Run("exit status", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want int
		}{
			{[]string{"true"}, 0},
			{[]string{"sh", "-c", "exit 3"}, 3},
			{[]string{"sh", "-c", "exit 255"}, 255},
			{[]string{"no-such-command-here"}, 127},
			{[]string{"sh", "-c", "kill -9 $$"}, 137},
		} {
			code, err := c.ExecStream(ctx, name, ExecOptions{Args: tc.args})
			if err != nil || code != tc.want {
				t.Errorf("%q: exit %d, %v; want %d", tc.args, code, err, tc.want)
			}
		}
	})

	t.Run("tty", func(t *testing.T) {
		var out bytes.Buffer
		code, err := c.ExecStream(ctx, name, ExecOptions{
			Args: []string{"sh", "-c", "tty; test -t 0 && test -t 1 && echo both-ttys; stty size; echo err >&2"},
			TTY:  true, Rows: 30, Cols: 100, Stdout: &out,
		})
		got := strings.ReplaceAll(out.String(), "\r\n", "\n")
		if err != nil || code != 0 || !strings.HasPrefix(got, "/dev/pts/") || !strings.Contains(got, "\nboth-ttys\n30 100\nerr\n") {
			t.Fatalf("on a pty: exit %d, %v, %q", code, err, out.String())
		}
		out.Reset()
		code, err = c.ExecStream(ctx, name, ExecOptions{Args: []string{"sh", "-c", "tty; test -t 0"}, Stdout: &out})
		if err != nil || code != 1 || !strings.Contains(out.String(), "not a tty") {
			t.Fatalf("without -t: exit %d, %v, %q", code, err, out.String())
		}
	})

	t.Run("window size changes", func(t *testing.T) {
		resize := make(chan agent.WindowSize, 1)
		out := &testutil.LockedBuffer{}
		res := make(chan execOutcome, 1)
		go func() {
			code, err := c.ExecStream(ctx, name, ExecOptions{
				Args: []string{"sh", "-c", `trap 'stty size; exit 4' WINCH; echo ready; i=0; while [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; exit 9`},
				TTY:  true, Rows: 24, Cols: 80, Stdout: out, Resize: resize,
			})
			res <- execOutcome{code, err}
		}()
		out.WaitFor(t, "ready", time.Minute)
		resize <- agent.WindowSize{Rows: 50, Cols: 132}
		r := <-res
		if r.err != nil || r.code != 4 || !strings.Contains(out.String(), "50 132") {
			t.Fatalf("after a window change: exit %d, %v, %q", r.code, r.err, out.String())
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		cctx, ccancel := context.WithCancel(ctx)
		out := &testutil.LockedBuffer{}
		res := make(chan execOutcome, 1)
		go func() {
			code, err := c.ExecStream(cctx, name, ExecOptions{Args: []string{"sh", "-c", "echo sleeping; exec sleep 1000"}, Stdout: out})
			res <- execOutcome{code, err}
		}()
		out.WaitFor(t, "sleeping", time.Minute)
		ccancel()
		if r := <-res; !errors.Is(r.err, context.Canceled) {
			t.Fatalf("cancelled exec: exit %d, %v", r.code, r.err)
		}
		deadline := time.Now().Add(time.Minute)
		for srv.activeCount(name) != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the daemon still counts a cancelled exec as a use")
			}
			time.Sleep(10 * time.Millisecond)
		}
	})

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			opts ExecOptions
			want error
		}{
			{"nope", ExecOptions{Args: []string{"true"}}, errdefs.ErrNotFound},
			{name, ExecOptions{}, errdefs.ErrInvalidArgument},
			{"Bad_Name", ExecOptions{Args: []string{"true"}}, errdefs.ErrInvalidArgument},
			{name, ExecOptions{Args: []string{"true"}, TTY: true, Rows: 70000}, errdefs.ErrInvalidArgument},
		} {
			if code, err := c.ExecStream(ctx, tc.name, tc.opts); !errors.Is(err, tc.want) {
				t.Errorf("exec in %s %+v: exit %d, %v; want %v", tc.name, tc.opts, code, err, tc.want)
			}
		}
	})
}

// TestExecStream runs the streaming exec against a real agent on this
// host.
func TestExecStream(t *testing.T) {
	m := newHostAgent(t)
	srv := newTestServer(m, &fakeGraph{})
	checkExecStream(t, srv, serve(t, srv), "dev")
}

// TestExecStreamBox runs the streaming exec, pause and unpause against a
// real box under QEMU.
func TestExecStreamBox(t *testing.T) {
	mgr, g := boxtest.NewManager(t)
	srv := newTestServer(mgr, g)
	c := serve(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := c.Create(ctx, CreateRequest{Name: "dev", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{testKey}}); err != nil {
		t.Fatal(err)
	}
	checkExecStream(t, srv, c, "dev")

	if bx, err := c.Pause(ctx, "dev"); err != nil || bx.State != box.StatePaused {
		t.Fatalf("pause: %+v, %v", bx, err)
	}
	if bx, err := c.Get(ctx, "dev"); err != nil || bx.State != box.StatePaused {
		t.Fatalf("a paused box: %+v, %v", bx, err)
	}
	if _, err := c.Pause(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("pause of an unknown box: %v", err)
	}
	if bx, err := c.Unpause(ctx, "dev"); err != nil || bx.State != box.StateRunning {
		t.Fatalf("unpause: %+v, %v", bx, err)
	}
	var out bytes.Buffer
	if code, err := c.ExecStream(ctx, "dev", ExecOptions{Args: []string{"echo", "awake"}, Stdout: &out}); err != nil || code != 0 || out.String() != "awake\n" {
		t.Fatalf("exec after unpause: exit %d, %v, %q", code, err, out.String())
	}
	if _, err := c.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Pause(ctx, "dev"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("pause of a stopped box: %v", err)
	}
}
