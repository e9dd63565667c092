package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/boxd-dev/boxd/internal/testutil"
)

// hostEnv is a kept process's environment in the tests.
var hostEnv = []string{"PATH=" + DefaultPath}

// runKept runs spec through c and returns its exit code and output.
func runKept(t *testing.T, c *Client, spec ProcessSpec, stdin io.Reader) (int, string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	code, err := c.Process(testCtx(t), spec, ProcessIO{Stdin: stdin, Stdout: &out, Stderr: &errOut})
	return code, out.String(), errOut.String(), err
}

func TestProcessStart(t *testing.T) {
	sys := &fakeSystem{}
	c := serve(t, &ServerConfig{System: sys})
	tests := []struct {
		name       string
		spec       ProcessSpec
		stdin      string
		wantCode   int
		wantOut    *regexp.Regexp
		wantErrOut string
	}{
		{name: "echo", spec: ProcessSpec{Args: []string{"echo", "hello"}, Env: hostEnv}, wantOut: regexp.MustCompile(`^hello\n$`)},
		{name: "exit status", spec: ProcessSpec{Args: []string{"sh", "-c", "exit 3"}, Env: hostEnv}, wantCode: 3, wantOut: regexp.MustCompile(`^$`)},
		{name: "stderr", spec: ProcessSpec{Args: []string{"sh", "-c", "echo oops >&2"}, Env: hostEnv}, wantOut: regexp.MustCompile(`^$`), wantErrOut: "oops\n"},
		{name: "signal", spec: ProcessSpec{Args: []string{"sh", "-c", "kill -9 $$"}, Env: hostEnv}, wantCode: 128 + 9, wantOut: regexp.MustCompile(`^$`)},
		{name: "no shell", spec: ProcessSpec{Args: []string{"echo", "$HOME", "a b", "*"}, Env: hostEnv}, wantOut: regexp.MustCompile(`^\$HOME a b \*\n$`)},
		{name: "whole env", spec: ProcessSpec{Args: []string{"/usr/bin/env"}, Env: []string{"A=1", "B=two words"}}, wantOut: regexp.MustCompile(`^A=1\nB=two words\n$`)},
		{name: "PATH of the spec", spec: ProcessSpec{Args: []string{"true"}, Env: []string{"PATH=/bin:/usr/bin"}}, wantOut: regexp.MustCompile(`^$`)},
		{name: "default cwd", spec: ProcessSpec{Args: []string{"pwd"}}, wantOut: regexp.MustCompile(`^/\n$`)},
		{name: "cwd", spec: ProcessSpec{Args: []string{"pwd"}, Cwd: "/tmp"}, wantOut: regexp.MustCompile(`^/tmp\n$`)},
		{
			name:    "credentials",
			spec:    ProcessSpec{Args: []string{"sh", "-c", "id -u; id -g; id -G"}, Env: hostEnv, UID: 65534, GID: 65533, AdditionalGids: []uint32{10, 11}},
			wantOut: regexp.MustCompile(`^65534\n65533\n65533 10 11\n$`),
		},
		{name: "stdin", spec: ProcessSpec{Args: []string{"cat"}, Env: hostEnv}, stdin: "piped\n", wantOut: regexp.MustCompile(`^piped\n$`)},
		{name: "terminal", spec: ProcessSpec{Args: []string{"tty"}, Env: hostEnv, Terminal: true}, wantOut: regexp.MustCompile(`^/dev/pts/\d+\r\n$`)},
		{name: "terminal size", spec: ProcessSpec{Args: []string{"stty", "size"}, Env: hostEnv, Terminal: true, Rows: 33, Cols: 101}, wantOut: regexp.MustCompile(`^33 101\r\n$`)},
		{name: "terminal stderr", spec: ProcessSpec{Args: []string{"sh", "-c", "echo oops >&2"}, Env: hostEnv, Terminal: true}, wantOut: regexp.MustCompile(`^oops\r\n$`)},
		{name: "hostname", spec: ProcessSpec{Args: []string{"true"}, Hostname: "ctr-1"}, wantOut: regexp.MustCompile(`^$`)},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.spec.ID = fmt.Sprintf("start-%d", i)
			var stdin io.Reader
			done := make(chan error, 1)
			if tt.stdin != "" {
				stdin = strings.NewReader(tt.stdin)
				go func() {
					// The channel's end does not end the input: only
					// close-stdin does, once the input has arrived.
					time.Sleep(50 * time.Millisecond)
					done <- c.CloseProcessStdin(testCtx(t), tt.spec.ID)
				}()
			} else {
				done <- nil
			}
			code, out, errOut, err := runKept(t, c, tt.spec, stdin)
			if err != nil {
				t.Fatal(err)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode || !tt.wantOut.MatchString(out) || errOut != tt.wantErrOut {
				t.Errorf("code %d, stdout %q, stderr %q; want %d, %v, %q", code, out, errOut, tt.wantCode, tt.wantOut, tt.wantErrOut)
			}
		})
	}
	if sys.hostname != "ctr-1" {
		t.Errorf("hostname %q, want ctr-1", sys.hostname)
	}
}

func TestProcessRefused(t *testing.T) {
	c := serve(t, &ServerConfig{})
	ctx := testCtx(t)
	if code, _, _, err := runKept(t, c, ProcessSpec{ID: "dup", Args: []string{"true"}}, nil); err != nil || code != 0 {
		t.Fatalf("code %d, err %v", code, err)
	}
	tests := []struct {
		name string
		spec ProcessSpec
		want error
	}{
		{"duplicate ID", ProcessSpec{ID: "dup", Args: []string{"true"}}, errdefs.ErrAlreadyExists},
		{"no ID", ProcessSpec{Args: []string{"true"}}, errdefs.ErrInvalidArgument},
		{"no program", ProcessSpec{ID: "a"}, errdefs.ErrInvalidArgument},
		{"program not in PATH", ProcessSpec{ID: "b", Args: []string{"boxd-no-such-program"}}, errdefs.ErrNotFound},
		{"missing program", ProcessSpec{ID: "c", Args: []string{"/boxd-no-such-folder/prog"}}, errdefs.ErrNotFound},
		{"missing cwd", ProcessSpec{ID: "d", Args: []string{"true"}, Cwd: "/boxd-no-such-folder"}, errdefs.ErrNotFound},
		{"hostname without a System", ProcessSpec{ID: "e", Args: []string{"true"}, Hostname: "h"}, errdefs.ErrNotImplemented},
		{"bad hostname", ProcessSpec{ID: "f", Args: []string{"true"}, Hostname: "-h"}, errdefs.ErrInvalidArgument},
		{"attach to an unknown ID", ProcessSpec{ID: "nope", Attach: true}, errdefs.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.Process(ctx, tt.spec, ProcessIO{})
			if !errors.Is(err, tt.want) || errors.Is(err, ErrDetached) {
				t.Errorf("Process = %v, want %v", err, tt.want)
			}
		})
	}
	for name, call := range map[string]func() error{
		"signal":      func() error { return c.SignalProcess(ctx, "nope", 15) },
		"resize":      func() error { return c.ResizeProcess(ctx, "nope", 10, 10) },
		"close-stdin": func() error { return c.CloseProcessStdin(ctx, "nope") },
		"forget":      func() error { return c.ForgetProcess(ctx, "nope") },
	} {
		if err := call(); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s of an unknown ID = %v, want not found", name, err)
		}
	}
	if err := c.ResizeProcess(ctx, "dup", 10, 10); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("resize without a terminal = %v, want failed precondition", err)
	}
	if err := c.SignalProcess(ctx, "dup", 15); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("signal to an exited process = %v, want not found", err)
	}
}

// cutWriter passes writes on until limit bytes have passed, then calls cut
// once and takes the rest.
type cutWriter struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	limit int
	cut   func()
	once  sync.Once
}

func (w *cutWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.buf.Write(p)
	over := w.buf.Len() >= w.limit
	w.mu.Unlock()
	if over {
		w.once.Do(w.cut)
	}
	return len(p), nil
}

func (w *cutWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

func TestProcessReattach(t *testing.T) {
	var want strings.Builder
	for i := 1; i <= 1000000; i++ {
		fmt.Fprintf(&want, "%d\n", i)
	}
	for _, how := range []string{"connection", "context"} {
		t.Run("detach by "+how, func(t *testing.T) {
			cfg := &ServerConfig{}
			c1, cc, sc := serveConns(t, cfg)
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			id := "seq-" + how
			first := &cutWriter{limit: 64 << 10}
			first.cut = func() {
				if how == "connection" {
					// Once the agent waits for the window (the client
					// holds it all, unread), nothing is in flight: the
					// bytes in the socket when a link breaks are lost.
					// A busy host (the race detector, other packages'
					// tests) may take a while to take in what was sent:
					// wait a second and until the sockets hold nothing.
					time.Sleep(time.Second)
					settle(t, cc, sc)
					c1.Close()
				} else {
					// The channel's close: what the agent sent before
					// it is still read.
					cancel()
				}
			}
			spec := ProcessSpec{ID: id, Args: []string{"seq", "1", "1000000"}, Env: hostEnv}
			_, err := c1.Process(ctx, spec, ProcessIO{Stdout: first})
			if !errors.Is(err, ErrDetached) || !errors.Is(err, errdefs.ErrUnavailable) {
				t.Fatalf("Process = %v, want detached", err)
			}
			// Output the process wrote meanwhile waits in the agent.
			time.Sleep(100 * time.Millisecond)
			c2 := serve(t, cfg)
			var rest bytes.Buffer
			code, err := c2.Process(testCtx(t), ProcessSpec{ID: id, Attach: true}, ProcessIO{Stdout: &rest})
			if err != nil || code != 0 {
				t.Fatalf("attach: code %d, err %v", code, err)
			}
			got := first.String() + rest.String()
			if got != want.String() {
				t.Errorf("got %d bytes over two attachments (%d + %d), want %d, identical", len(got), len(first.String()), rest.Len(), want.Len())
			}
			// The exit status is kept until forgotten.
			code, err = c2.Process(testCtx(t), ProcessSpec{ID: id, Attach: true}, ProcessIO{})
			if err != nil || code != 0 {
				t.Errorf("attach after the end: code %d, err %v", code, err)
			}
		})
	}
}

func TestProcessStdinAcrossAttach(t *testing.T) {
	cfg := &ServerConfig{}
	c1 := serve(t, cfg)
	ctx, cancel := context.WithCancel(testCtx(t))
	in, inW := io.Pipe()
	defer inW.Close()
	out := &testutil.LockedBuffer{}
	res := make(chan error, 1)
	go func() {
		_, err := c1.Process(ctx, ProcessSpec{ID: "cat", Args: []string{"cat"}, Env: hostEnv}, ProcessIO{Stdin: in, Stdout: out})
		res <- err
	}()
	if _, err := inW.Write([]byte("one\n")); err != nil {
		t.Fatal(err)
	}
	out.WaitFor(t, "one\n", 10*time.Second)
	cancel()
	if err := <-res; !errors.Is(err, ErrDetached) {
		t.Fatalf("Process = %v, want detached", err)
	}

	c2 := serve(t, cfg)
	rest := &testutil.LockedBuffer{}
	go func() {
		code, err := c2.Process(testCtx(t), ProcessSpec{ID: "cat", Attach: true}, ProcessIO{Stdin: strings.NewReader("two\n"), Stdout: rest})
		if err == nil && code != 0 {
			err = fmt.Errorf("exit code %d", code)
		}
		res <- err
	}()
	rest.WaitFor(t, "two\n", 10*time.Second)
	list, err := c2.Processes(testCtx(t))
	if err != nil || len(list) != 1 || list[0].ID != "cat" || !list[0].Running || list[0].Pid <= 0 {
		t.Fatalf("Processes = %+v, %v; want cat running", list, err)
	}
	if err := c2.CloseProcessStdin(testCtx(t), "cat"); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if got := out.String() + rest.String(); got != "one\ntwo\n" {
		t.Errorf("output %q, want one, two", got)
	}
	list, err = c2.Processes(testCtx(t))
	if err != nil || len(list) != 1 || list[0].Running || list[0].ExitCode != 0 {
		t.Errorf("Processes = %+v, %v; want cat exited 0", list, err)
	}
}

func TestProcessSignal(t *testing.T) {
	// A test run started with SIGHUP ignored (under nohup) passes that on to the processes it starts, which then
	// outlive the hangup below. With a handler of its own, exec gives them the default.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	c := serve(t, &ServerConfig{})
	tests := []struct {
		name string
		spec ProcessSpec
		sig  int
		want int
	}{
		{"term", ProcessSpec{Args: []string{"sleep", "100"}}, 15, 128 + 15},
		{"kill", ProcessSpec{Args: []string{"sleep", "100"}}, 9, 128 + 9},
		// With a terminal the group gets it: the shell's child too.
		{"terminal group", ProcessSpec{Args: []string{"sh", "-c", "sleep 100; exit 0"}, Terminal: true}, 1, 128 + 1},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.spec.ID, tt.spec.Env = fmt.Sprintf("sig-%d", i), hostEnv
			res := make(chan int, 1)
			go func() {
				code, err := c.Process(testCtx(t), tt.spec, ProcessIO{})
				if err != nil {
					t.Error(err)
				}
				res <- code
			}()
			waitRunning(t, c, tt.spec.ID)
			time.Sleep(100 * time.Millisecond) // the shell starts its child
			if err := c.SignalProcess(testCtx(t), tt.spec.ID, tt.sig); err != nil {
				t.Fatal(err)
			}
			if code := <-res; code != tt.want {
				t.Errorf("code %d, want %d", code, tt.want)
			}
		})
	}
	if err := c.SignalProcess(testCtx(t), "sig-0", 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("signal 0 = %v, want invalid argument", err)
	}
}

// waitRunning waits until kept process id is listed.
func waitRunning(t *testing.T, c *Client, id string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		list, err := c.Processes(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range list {
			if p.ID == id && p.Running {
				return
			}
		}
	}
	t.Fatalf("process %q is not running", id)
}

func TestProcessResize(t *testing.T) {
	c := serve(t, &ServerConfig{})
	out := &testutil.LockedBuffer{}
	res := make(chan error, 1)
	in, inW := io.Pipe()
	defer inW.Close()
	go func() {
		_, err := c.Process(testCtx(t), ProcessSpec{
			ID: "tty", Args: []string{"sh", "-c", "echo ready; read x; stty size"}, Env: hostEnv, Terminal: true, Rows: 10, Cols: 20,
		}, ProcessIO{Stdin: in, Stdout: out})
		res <- err
	}()
	out.WaitFor(t, "ready", 10*time.Second)
	if err := c.ResizeProcess(testCtx(t), "tty", 40, 132); err != nil {
		t.Fatal(err)
	}
	if _, err := inW.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "40 132") {
		t.Errorf("output %q does not show 40 132", out.String())
	}
}

func TestProcessForget(t *testing.T) {
	c := serve(t, &ServerConfig{})
	ctx := testCtx(t)
	res := make(chan error, 1)
	go func() {
		_, err := c.Process(ctx, ProcessSpec{ID: "p", Args: []string{"sleep", "100"}, Env: hostEnv}, ProcessIO{})
		res <- err
	}()
	waitRunning(t, c, "p")
	if err := c.ForgetProcess(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	if err := <-res; !errors.Is(err, ErrDetached) {
		t.Errorf("Process of a forgotten process = %v, want detached", err)
	}
	if list, err := c.Processes(ctx); err != nil || len(list) != 0 {
		t.Errorf("Processes = %+v, %v; want none", list, err)
	}
	// Its ID may be used again; an exited process is kept until forgotten.
	if code, out, _, err := runKept(t, c, ProcessSpec{ID: "p", Args: []string{"echo", "again"}, Env: hostEnv}, nil); err != nil || code != 0 || out != "again\n" {
		t.Fatalf("code %d, output %q, err %v", code, out, err)
	}
	if code, _, _, err := runKept(t, c, ProcessSpec{ID: "p", Attach: true}, nil); err != nil || code != 0 {
		t.Errorf("attach after the end: code %d, err %v", code, err)
	}
	if err := c.ForgetProcess(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := runKept(t, c, ProcessSpec{ID: "p", Attach: true}, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("attach after forget = %v, want not found", err)
	}
}

// TestProcessReaper runs kept processes through a Reaper, as the agent as
// PID 1 does: each gets its own exit status, also one that exits while
// nothing is attached, among orphans that the Reaper reaps.
func TestProcessReaper(t *testing.T) {
	c := serve(t, &ServerConfig{Reaper: subreaper(t)})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("reaped-%d", i)
			spec := ProcessSpec{ID: id, Args: []string{"sh", "-c", fmt.Sprintf("(exec sleep 0.05 >/dev/null 2>&1 &); sleep 0.1; exit %d", i%7)}, Env: hostEnv}
			if i%2 == 1 {
				// Detached at once: the status waits for the attach.
				ctx, cancel := context.WithCancel(testCtx(t))
				cancel()
				if _, err := c.Process(ctx, spec, ProcessIO{}); !errors.Is(err, ErrDetached) {
					t.Errorf("process %d: %v, want detached", i, err)
					return
				}
				time.Sleep(300 * time.Millisecond)
				spec = ProcessSpec{ID: id, Attach: true}
			}
			code, err := c.Process(testCtx(t), spec, ProcessIO{})
			if err != nil || code != i%7 {
				t.Errorf("process %d: code %d, err %v; want %d", i, code, err, i%7)
			}
		}()
	}
	wg.Wait()
}
