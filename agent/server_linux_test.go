package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"

	"github.com/boxd-dev/boxd/internal/testutil"
)

// socketPair returns the two ends of a connected unix socket pair: a byte stream with buffers, like the host's
// socket to QEMU and the guest's port together.
func socketPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	client, server, err := testutil.SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	return client, server
}

// fakeSystem records what a Unique request asked of the machine.
type fakeSystem struct {
	mu        sync.Mutex
	calls     []string
	seed      []byte
	clock     time.Time
	hostname  string
	machineID string
	failHost  error
}

func (f *fakeSystem) AddEntropy(seed []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "entropy")
	f.seed = append([]byte(nil), seed...)
	return nil
}

func (f *fakeSystem) SetClock(t time.Time) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "clock")
	f.clock = t
	return nil
}

func (f *fakeSystem) SetHostname(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "hostname")
	if f.failHost != nil {
		return f.failHost
	}
	f.hostname = name
	return nil
}

func (f *fakeSystem) SetMachineID(id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "machine-id")
	f.machineID = id
	return nil
}

// serve runs Serve on one end of a socket pair and returns a client on the other; cleanup closes both and waits
// for Serve to return.
func serve(t *testing.T, cfg *ServerConfig) *Client {
	t.Helper()
	c, _, _ := serveConns(t, cfg)
	return c
}

// serveConns is serve, also returning the client's and the server's ends of
// the socket pair between them.
func serveConns(t *testing.T, cfg *ServerConfig) (*Client, net.Conn, net.Conn) {
	t.Helper()
	cc, sc := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, sc, cfg) }()
	hctx, hcancel := context.WithTimeout(ctx, 10*time.Second)
	defer hcancel()
	c, err := NewClient(hctx, cc)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after the client closed")
		}
		cancel()
	})
	return c, cc, sc
}

// queued is what conn (a unix socket) holds that its reader has not taken:
// unread by this end (SIOCINQ) and sent but unread by the other (SIOCOUTQ).
func queued(t *testing.T, conn net.Conn) int {
	t.Helper()
	raw, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var in, out int
	var ierr, oerr error
	if err := raw.Control(func(fd uintptr) {
		in, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		out, oerr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
	}); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(ierr, oerr); err != nil {
		t.Fatal(err)
	}
	return in + out
}

// settle waits until the sockets have held nothing in flight for a few looks
// in a row (at most 10 s): a busy host may take a while to read what was sent.
func settle(t *testing.T, conns ...net.Conn) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for calm := 0; calm < 5 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		n := 0
		for _, c := range conns {
			n += queued(t, c)
		}
		if n == 0 {
			calm++
		} else {
			calm = 0
		}
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestRun(t *testing.T) {
	c := serve(t, nil)
	bigOutput := 1 << 20
	tests := []struct {
		name       string
		cmd        Command
		wantCode   int
		wantOut    string // exact stdout, unless wantOutLen or wantOutHas is set
		wantOutLen int
		wantOutHas string
		wantErrHas string
	}{
		{name: "echo", cmd: Command{Args: []string{"echo", "hello"}}, wantOut: "hello\n"},
		{name: "exit status", cmd: Command{Shell: "exit 3"}, wantCode: 3},
		{name: "missing command", cmd: Command{Args: []string{"boxd-no-such-command"}}, wantCode: 127, wantErrHas: "not found"},
		{name: "stderr", cmd: Command{Shell: "echo oops >&2; exit 1"}, wantCode: 1, wantErrHas: "oops"},
		{name: "stdin", cmd: Command{Args: []string{"cat"}, Stdin: strings.NewReader("piped\nlines\n")}, wantOut: "piped\nlines\n"},
		{name: "stdin end of file", cmd: Command{Shell: "wc -c", Stdin: strings.NewReader("12345")}, wantOut: "5\n"},
		{name: "no stdin", cmd: Command{Args: []string{"cat"}}, wantOut: ""},
		{name: "env", cmd: Command{Shell: `echo "$FOO"`, Env: map[string]string{"FOO": "bar baz"}}, wantOut: "bar baz\n"},
		{
			name:    "quoting",
			cmd:     Command{Args: []string{"printf", "%s|", "a b", "it's", "$HOME", "", "*"}},
			wantOut: "a b|it's|$HOME||*|",
		},
		{
			name:    "environment and directory",
			cmd:     Command{Shell: `echo "$HOME $PATH $USER $(pwd)"`},
			wantOut: "/root " + DefaultPath + " root /root\n",
		},
		{
			name:       "login shell",
			cmd:        Command{Stdin: strings.NewReader("echo from-the-shell\nexit 4\n")},
			wantCode:   4,
			wantOutHas: "from-the-shell\n",
		},
		{name: "large output", cmd: Command{Shell: "head -c 1048576 /dev/zero"}, wantOutLen: bigOutput},
		{name: "signal death", cmd: Command{Shell: "kill -TERM $$"}, wantCode: 128 + 15},
		{
			// A background process keeps stdout open; the session still ends soon after the shell exits.
			name:    "background process holds output",
			cmd:     Command{Shell: "sleep 3 & echo started"},
			wantOut: "started\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			tt.cmd.Stdout, tt.cmd.Stderr = &stdout, &stderr
			start := time.Now()
			code, err := c.Run(testCtx(t), tt.cmd)
			if err != nil {
				t.Fatal(err)
			}
			if elapsed := time.Since(start); elapsed > 10*time.Second {
				t.Errorf("took %v", elapsed)
			}
			if code != tt.wantCode {
				t.Errorf("exit code %d, want %d (stderr %q)", code, tt.wantCode, stderr.String())
			}
			switch {
			case tt.wantOutLen > 0:
				if stdout.Len() != tt.wantOutLen {
					t.Errorf("stdout has %d bytes, want %d", stdout.Len(), tt.wantOutLen)
				}
			case tt.wantOutHas != "":
				if !strings.Contains(stdout.String(), tt.wantOutHas) {
					t.Errorf("stdout %q does not contain %q", stdout.String(), tt.wantOutHas)
				}
			default:
				if stdout.String() != tt.wantOut {
					t.Errorf("stdout %q, want %q", stdout.String(), tt.wantOut)
				}
			}
			if tt.wantErrHas != "" && !strings.Contains(stderr.String(), tt.wantErrHas) {
				t.Errorf("stderr %q does not contain %q", stderr.String(), tt.wantErrHas)
			}
		})
	}
}

func TestRunConcurrent(t *testing.T) {
	c := serve(t, nil)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, err := c.Run(testCtx(t), Command{Shell: "exit " + string(rune('0'+i%10))})
			if err != nil || code != i%10 {
				t.Errorf("exit %d: code %d, err %v", i%10, code, err)
			}
		}()
	}
	wg.Wait()
}

func TestOutput(t *testing.T) {
	c := serve(t, nil)
	out, err := c.Output(testCtx(t), "echo", "hi")
	if err != nil || string(out) != "hi\n" {
		t.Fatalf("Output = %q, %v", out, err)
	}
	_, err = c.Output(testCtx(t), "sh", "-c", "echo broken >&2; exit 5")
	var exit *ExitError
	if !errors.As(err, &exit) || exit.Code != 5 || !strings.Contains(err.Error(), "broken") ||
		!strings.Contains(err.Error(), "status 5") {
		t.Fatalf("Output of a failing command: %v", err)
	}
}

func TestPTY(t *testing.T) {
	c := serve(t, nil)
	tests := []struct {
		name string
		cmd  Command
		want *regexp.Regexp
	}{
		{"tty", Command{Args: []string{"tty"}}, regexp.MustCompile(`^/dev/pts/\d+\r\n$`)},
		{"size", Command{Args: []string{"stty", "size"}, Rows: 33, Cols: 101}, regexp.MustCompile(`^33 101\r\n$`)},
		{"default size", Command{Args: []string{"stty", "size"}}, regexp.MustCompile(`^24 80\r\n$`)},
		{"default term", Command{Shell: `echo "$TERM"`}, regexp.MustCompile(`^xterm\r\n$`)},
		{"term", Command{Shell: `echo "$TERM"`, Env: map[string]string{"TERM": "vt100"}}, regexp.MustCompile(`^vt100\r\n$`)},
		{"stderr on the terminal", Command{Shell: `echo oops >&2`}, regexp.MustCompile(`^oops\r\n$`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			tt.cmd.TTY, tt.cmd.Stdout = true, &out
			code, err := c.Run(testCtx(t), tt.cmd)
			if err != nil || code != 0 {
				t.Fatalf("code %d, err %v, output %q", code, err, out.String())
			}
			if !tt.want.MatchString(out.String()) {
				t.Errorf("output %q, want %v", out.String(), tt.want)
			}
		})
	}

	t.Run("window change", func(t *testing.T) {
		out := &testutil.LockedBuffer{}
		resize := make(chan WindowSize, 1)
		done := make(chan struct{})
		go func() {
			defer close(done)
			select {
			case <-out.Seen("ready"):
				resize <- WindowSize{Rows: 50, Cols: 132}
			case <-time.After(20 * time.Second):
			}
		}()
		code, err := c.Run(testCtx(t), Command{
			Shell:  `trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.05; done`,
			TTY:    true,
			Rows:   10,
			Cols:   20,
			Stdout: out,
			Resize: resize,
		})
		<-done
		if err != nil || code != 0 {
			t.Fatalf("code %d, err %v, output %q", code, err, out.String())
		}
		if !strings.Contains(out.String(), "50 132") {
			t.Errorf("output %q does not show the new size 50 132", out.String())
		}
	})
}

func TestSignal(t *testing.T) {
	c := serve(t, nil)
	t.Run("run", func(t *testing.T) {
		sigs := make(chan ssh.Signal, 1)
		sigs <- ssh.SIGTERM
		start := time.Now()
		code, err := c.Run(testCtx(t), Command{Args: []string{"sleep", "100"}, Signals: sigs})
		if err != nil || code != 128+15 {
			t.Fatalf("code %d, err %v; want 143", code, err)
		}
		if time.Since(start) > 10*time.Second {
			t.Errorf("the signal took %v", time.Since(start))
		}
	})
	t.Run("exit-signal", func(t *testing.T) {
		sess, err := c.SSH().NewSession()
		if err != nil {
			t.Fatal(err)
		}
		defer sess.Close()
		if err := sess.Start("sleep 100"); err != nil {
			t.Fatal(err)
		}
		if err := sess.Signal(ssh.SIGKILL); err != nil {
			t.Fatal(err)
		}
		err = sess.Wait()
		var exit *ssh.ExitError
		if !errors.As(err, &exit) || exit.Signal() != "KILL" {
			t.Fatalf("Wait = %v, want an exit-signal KILL", err)
		}
	})
	t.Run("context", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := c.Run(ctx, Command{Args: []string{"sleep", "100"}})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Run = %v, want a deadline error", err)
		}
		if time.Since(start) > 10*time.Second {
			t.Errorf("Run returned after %v", time.Since(start))
		}
	})
}

func TestSFTP(t *testing.T) {
	c := serve(t, nil)
	sc, err := sftp.NewClient(c.SSH())
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	path := filepath.Join(t.TempDir(), "hello.txt")
	want := bytes.Repeat([]byte("boxd sftp\n"), 10000)
	f, err := sc.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(want); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("file on disk: %d bytes, %v; want %d bytes", len(got), err, len(want))
	}
	r, err := sc.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r)
	r.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back %d bytes, %v; want %d bytes", len(got), err, len(want))
	}
	wd, err := sc.Getwd()
	if err != nil || wd != "/root" {
		t.Errorf("working directory %q, %v; want /root", wd, err)
	}
}

func TestDirectTCPIP(t *testing.T) {
	c := serve(t, nil)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_, _ = io.Copy(conn, conn) // echo until the client half-closes
			}()
		}
	}()

	conn, err := c.SSH().Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo %q, %v", buf, err)
	}

	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := closed.Addr().String()
	closed.Close()
	if conn, err := c.SSH().Dial("tcp", addr); err == nil {
		conn.Close()
		t.Fatalf("dial of a closed port %s succeeded", addr)
	}
}

func TestHealth(t *testing.T) {
	c := serve(t, nil)
	h, err := c.Health(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	if h.Hostname != host || h.Kernel != unix.ByteSliceToString(uts.Release[:]) || h.Uptime <= 0 {
		t.Errorf("health %+v; want hostname %q, kernel %q, uptime > 0", h, host, unix.ByteSliceToString(uts.Release[:]))
	}
}

func TestUnique(t *testing.T) {
	sys := &fakeSystem{}
	c := serve(t, &ServerConfig{System: sys})
	u, err := NewUnique("fork-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Unique(testCtx(t), u); err != nil {
		t.Fatal(err)
	}
	sys.mu.Lock()
	if !bytes.Equal(sys.seed, u.Seed) || len(sys.seed) != seedSize || sys.clock.UnixNano() != u.TimeUnixNano ||
		sys.hostname != "fork-1" || sys.machineID != u.MachineID ||
		strings.Join(sys.calls, ",") != "entropy,clock,hostname,machine-id" {
		t.Errorf("system saw calls %v, seed %x, clock %v, hostname %q, machine-id %q; sent %+v",
			sys.calls, sys.seed, sys.clock, sys.hostname, sys.machineID, u)
	}
	sys.calls = nil
	sys.failHost = errors.New("hostname is read-only")
	sys.mu.Unlock()

	if err := c.Unique(testCtx(t), Unique{Hostname: "other"}); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("a failing hostname: %v; want the guest's reason", err)
	}
	if err := c.Unique(testCtx(t), Unique{MachineID: "not-hex"}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("a bad machine-id: %v; want an invalid argument", err)
	}
	if ok, reply, err := c.SSH().SendRequest(RequestUnique, true, []byte("{not json")); err != nil || ok {
		t.Errorf("malformed unique request: ok %v, reply %q, err %v; want a refusal", ok, reply, err)
	}

	bare := serve(t, nil)
	if err := bare.Unique(testCtx(t), Unique{Hostname: "x"}); err == nil {
		t.Error("an agent without a System applied a unique request")
	}
}

func TestUniqueValidate(t *testing.T) {
	tests := []struct {
		name string
		u    Unique
		ok   bool
	}{
		{"empty", Unique{}, true},
		{"full", Unique{Seed: []byte{1}, TimeUnixNano: 1, Hostname: "box-1.example", MachineID: strings.Repeat("a1", 16)}, true},
		{"big seed", Unique{Seed: make([]byte, 4097)}, false},
		{"negative time", Unique{TimeUnixNano: -1}, false},
		{"hostname with space", Unique{Hostname: "a b"}, false},
		{"hostname with leading dash", Unique{Hostname: "-a"}, false},
		{"hostname too long", Unique{Hostname: strings.Repeat("a", 65)}, false},
		{"machine-id upper case", Unique{MachineID: strings.Repeat("A1", 16)}, false},
		{"machine-id short", Unique{MachineID: "abc"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.u.Validate()
			if (err == nil) != tt.ok || (err != nil && !errdefs.IsInvalidArgument(err)) {
				t.Errorf("Validate = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

func TestShellQuote(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"/usr/bin/env", "/usr/bin/env"},
		{"", "''"},
		{"a b", "'a b'"},
		{"it's", `'it'\''s'`},
		{"$HOME", "'$HOME'"},
	}
	for _, tt := range tests {
		if got := ShellQuote(tt.in); got != tt.want {
			t.Errorf("ShellQuote(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestServeSerial serves one connection after another, as on the guest's port: a client that vanishes mid-session,
// garbage before a handshake, and a peer that says something and goes silent each lead to the next connection.
func TestServeSerial(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conns := make(chan io.ReadWriteCloser)
	next := func(ctx context.Context) (io.ReadWriteCloser, error) {
		select {
		case c := <-conns:
			return c, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	var logMu sync.Mutex
	var logged []string
	cfg := &ServerConfig{HandshakeTimeout: time.Second, Logf: func(format string, args ...any) {
		logMu.Lock()
		defer logMu.Unlock()
		logged = append(logged, format)
	}}
	done := make(chan error, 1)
	go func() { done <- ServeSerial(ctx, next, cfg) }()

	// offer hands the loop its next connection; it waits until the loop is done with the one before.
	offer := func(c net.Conn) {
		t.Helper()
		select {
		case conns <- c:
		case <-time.After(15 * time.Second):
			t.Fatal("the loop did not take the next connection: the one before wedged it")
		}
	}
	connect := func() (*Client, net.Conn) {
		t.Helper()
		cc, sc := socketPair(t)
		offer(sc)
		c, err := NewClient(testCtx(t), cc)
		if err != nil {
			t.Fatal(err)
		}
		return c, cc
	}
	check := func(c *Client) {
		t.Helper()
		out, err := c.Output(testCtx(t), "echo", "alive")
		if err != nil || string(out) != "alive\n" {
			t.Fatalf("Output = %q, %v", out, err)
		}
	}

	c1, raw1 := connect()
	check(c1)
	sess, err := c1.SSH().NewSession()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Start("cat"); err != nil {
		t.Fatal(err)
	}
	raw1.Close() // the host vanishes mid-session; cat gets end of file
	c1.Close()

	c2, _ := connect()
	check(c2)
	c2.Close()

	// Garbage with no line end: over SSH's 255-byte limit for a version line.
	garbage, sc := socketPair(t)
	defer garbage.Close()
	if _, err := garbage.Write(bytes.Repeat([]byte{0xff}, 1000)); err != nil {
		t.Fatal(err)
	}
	offer(sc)
	c3, _ := connect()
	check(c3)
	c3.Close()

	// A line of garbage and then silence: the handshake timeout ends it.
	silent, sc := socketPair(t)
	defer silent.Close()
	if _, err := silent.Write([]byte("stale bytes from an old connection\r\n")); err != nil {
		t.Fatal(err)
	}
	offer(sc)
	c4, _ := connect()
	check(c4)
	c4.Close()

	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("ServeSerial = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeSerial did not return after its context ended")
	}
}

// acceptEach listens on a unix socket in a test folder and hands each connection to handle, with its number
// (from 0) and a context that ends with the test; it returns the socket's path.
func acceptEach(t *testing.T, handle func(ctx context.Context, i int, conn net.Conn)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); l.Close() })
	go func() {
		for i := 0; ; i++ {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			handle(ctx, i, conn)
		}
	}()
	return path
}

// TestDial reaches an agent behind a unix socket whose first connections fail, as QEMU's chardev does while the
// guest boots or after a restore.
func TestDial(t *testing.T) {
	path := acceptEach(t, func(ctx context.Context, i int, conn net.Conn) {
		switch i {
		case 0:
			conn.Close() // hung up at once
		case 1:
			_, _ = conn.Write([]byte("SSH-2.0-stale\r\n\x00\x00\x00\x10garbage"))
			conn.Close()
		default:
			go func() { _ = Serve(ctx, conn, nil) }()
		}
	})
	c, err := Dial(testCtx(t), path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	out, err := c.Output(testCtx(t), "echo", "dialed")
	if err != nil || string(out) != "dialed\n" {
		t.Fatalf("Output = %q, %v", out, err)
	}

	dctx, dcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer dcancel()
	if _, err := Dial(dctx, filepath.Join(t.TempDir(), "nobody.sock")); !errdefs.IsUnavailable(err) {
		t.Errorf("Dial of a socket nobody serves = %v, want unavailable", err)
	}
}

// TestDialBooting: a guest that opens its port after AttemptTimeout, as a booting one may, is reached on the
// first connection by DialBooting, while Dial gives up that connection and makes another.
func TestDialBooting(t *testing.T) {
	for _, tc := range []struct {
		name  string
		dial  func(context.Context, string) (*Client, error)
		conns int
	}{
		{"DialBooting", DialBooting, 1},
		{"Dial", Dial, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var accepted atomic.Int32
			path := acceptEach(t, func(ctx context.Context, i int, conn net.Conn) {
				accepted.Add(1)
				go func() {
					if i == 0 { // the guest opens its port late; what the host sent meanwhile waits
						time.Sleep(AttemptTimeout + time.Second)
					}
					_ = Serve(ctx, conn, nil)
				}()
			})
			dctx, dcancel := context.WithTimeout(context.Background(), 4*AttemptTimeout)
			defer dcancel()
			c, err := tc.dial(dctx, path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if out, err := c.Output(testCtx(t), "echo", "up"); err != nil || string(out) != "up\n" {
				t.Fatalf("Output = %q, %v", out, err)
			}
			if n := accepted.Load(); int(n) != tc.conns {
				t.Errorf("%s made %d connections, want %d", tc.name, n, tc.conns)
			}
		})
	}
}

// TestExactSFTP checks that the ExactSFTP subsystem makes a symbolic link
// with a relative target as it is asked (the sftp one joins the target to
// its working folder, as SFTP servers do).
func TestExactSFTP(t *testing.T) {
	c := serve(t, nil)
	dir := t.TempDir()
	for _, tc := range []struct {
		subsystem, want string
	}{
		{ExactSFTP, "busybox"},
		{ExactSFTP, "../bin/busybox"},
	} {
		sess, err := c.SSH().NewSession()
		if err != nil {
			t.Fatal(err)
		}
		w, _ := sess.StdinPipe()
		r, _ := sess.StdoutPipe()
		if err := sess.RequestSubsystem(tc.subsystem); err != nil {
			t.Fatal(err)
		}
		sc, err := sftp.NewClientPipe(r, w)
		if err != nil {
			t.Fatal(err)
		}
		link := filepath.Join(dir, "sh-"+strings.ReplaceAll(tc.want, "/", "-"))
		if err := sc.Symlink(tc.want, link); err != nil {
			t.Fatal(err)
		}
		sc.Close()
		sess.Close()
		if got, err := os.Readlink(link); err != nil || got != tc.want {
			t.Errorf("%s: the link points to %q (%v), want %q", tc.subsystem, got, err, tc.want)
		}
	}
}
