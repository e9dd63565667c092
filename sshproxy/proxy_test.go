package sshproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"golang.org/x/crypto/ssh"
)

// testEnv is a proxy on a loopback port in front of a testBackend.
type testEnv struct {
	backend *testBackend
	server  *Server
	port    int
	logs    *testutil.LockedBuffer
	served  chan error // Serve's result

	mu       sync.Mutex
	outcomes map[Outcome]int // what Server.Observe was told
}

// outcome is how often Server.Observe was told o; a connection's last
// outcome may come a moment after its client exits.
func (e *testEnv) outcome(o Outcome) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.outcomes[o]
}

// waitOutcomes waits until Server.Observe was told want.
func (e *testEnv) waitOutcomes(t *testing.T, want map[Outcome]int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		same := true
		for _, o := range []Outcome{Refused, Failed, Connected, Unreachable, Disconnected} {
			same = same && e.outcome(o) == want[o]
		}
		if same {
			return
		}
		if time.Now().After(deadline) {
			e.mu.Lock()
			defer e.mu.Unlock()
			t.Fatalf("outcomes %v, want %v", e.outcomes, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	return newTestEnvWith(t, nil)
}

// newTestEnvWith is newTestEnv with the server adjusted by adjust before
// it serves.
func newTestEnvWith(t *testing.T, adjust func(*Server)) *testEnv {
	t.Helper()
	for _, tool := range []string{"ssh", "scp", "sftp"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("the OpenSSH client %s is not installed", tool)
		}
	}
	hostKey, err := LoadOrCreateHostKey(filepath.Join(t.TempDir(), "host_key"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &testEnv{
		backend: newTestBackend(t),
		port:    l.Addr().(*net.TCPAddr).Port,
		logs:    &testutil.LockedBuffer{},
		served:  make(chan error, 1),

		outcomes: map[Outcome]int{},
	}
	e.server = &Server{
		HostKey: hostKey,
		Backend: e.backend,
		Logger:  slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Observe: func(o Outcome) {
			e.mu.Lock()
			e.outcomes[o]++
			e.mu.Unlock()
		},
	}
	if adjust != nil {
		adjust(e.server)
	}
	go func() { e.served <- e.server.Serve(l) }()
	t.Cleanup(func() {
		if err := e.server.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-e.served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", e.logs.String())
		}
	})
	return e
}

// testKey is an ed25519 key pair whose private half is on disk in OpenSSH
// format, for the OpenSSH client's -i.
type testKey struct {
	path   string
	pub    ssh.PublicKey
	signer ssh.Signer
}

func newTestKey(t *testing.T) testKey {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "boxd test key")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "id_ed25519")
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return testKey{path: path, pub: signer.PublicKey(), signer: signer}
}

// opts are the OpenSSH client options every test uses: no config, no known
// hosts, no agent, only the keys given, quiet. OpenSSH keeps the first
// value of an option, so options given before these override them.
func (e *testEnv) opts(keys ...testKey) []string {
	args := []string{
		"-F", "none",
		"-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes",
		"-o", "IdentityAgent=none",
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=10",
		"-o", "LogLevel=ERROR",
	}
	for _, k := range keys {
		args = append(args, "-i", k.path)
	}
	return args
}

type result struct {
	stdout, stderr string
	code           int
}

// run runs an OpenSSH tool to completion.
func run(t *testing.T, stdin io.Reader, tool string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("%s: %v", tool, err)
	}
	return result{stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()}
}

// ssh runs `ssh [extra] [opts] user@127.0.0.1 command`.
func (e *testEnv) ssh(t *testing.T, stdin io.Reader, keys []testKey, extra []string, user, command string) result {
	t.Helper()
	args := append(slices.Clone(extra), e.opts(keys...)...)
	args = append(args, "-p", strconv.Itoa(e.port))
	args = append(args, user+"@127.0.0.1")
	if command != "" {
		args = append(args, command)
	}
	return run(t, stdin, "ssh", args...)
}

func TestSSH(t *testing.T) {
	e := newTestEnv(t)
	owner, stranger := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	e.backend.addBox("other", stranger.pub)

	big := make([]byte, 1<<20)
	rand.Read(big)
	sum := sha256.Sum256(big)

	tests := []struct {
		name    string
		user    string
		keys    []testKey
		extra   []string
		command string
		stdin   []byte
		want    result
		match   *regexp.Regexp // matched against stdout instead of want.stdout
	}{
		{name: "echo", command: "echo hello", want: result{stdout: "hello\n"}},
		{name: "exit status", command: "echo out; exit 3", want: result{stdout: "out\n", code: 3}},
		{name: "stderr", command: "echo oops >&2; exit 1", want: result{stderr: "oops\n", code: 1}},
		{name: "exit status after much output", command: "head -c 3000000 /dev/zero | tr '\\0' a; head -c 1000000 /dev/zero | tr '\\0' b >&2; exit 7",
			want: result{stdout: strings.Repeat("a", 3000000), stderr: strings.Repeat("b", 1000000), code: 7}},
		{name: "stdin", command: "sha256sum", stdin: big, want: result{stdout: hex.EncodeToString(sum[:]) + "  -\n"}},
		{name: "pty", extra: []string{"-tt"}, command: "tty", match: regexp.MustCompile(`^/dev/pts/[0-9]+\r\n$`)},
		{name: "no pty", command: "tty", want: result{stdout: "not a tty\n", code: 1}},
		{name: "env", extra: []string{"-o", "SetEnv=FOO=bar"}, command: "echo $FOO", want: result{stdout: "bar\n"}},
		{name: "second key offered", keys: []testKey{stranger, owner}, command: "echo in", want: result{stdout: "in\n"}},
	}
	t.Run("group", func(t *testing.T) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				user, keys := tt.user, tt.keys
				if user == "" {
					user = "dev"
				}
				if keys == nil {
					keys = []testKey{owner}
				}
				var stdin io.Reader
				if tt.stdin != nil {
					stdin = bytes.NewReader(tt.stdin)
				}
				got := e.ssh(t, stdin, keys, tt.extra, user, tt.command)
				if tt.match != nil {
					if !tt.match.MatchString(got.stdout) {
						t.Errorf("stdout %q does not match %v", got.stdout, tt.match)
					}
					got.stdout = ""
				}
				if got != tt.want {
					t.Errorf("got %+v, want %+v", got, tt.want)
				}
			})
		}
	})
	// Every connection went through Connect, and they shared one client.
	if n := e.backend.connectCount("dev"); n != len(tests) {
		t.Errorf("Connect called %d times for %d connections", n, len(tests))
	}
	e.backend.mu.Lock()
	defer e.backend.mu.Unlock()
	if n := len(e.backend.clients); n != 1 {
		t.Errorf("%d agent clients, want 1 shared", n)
	}
	e.waitOutcomes(t, map[Outcome]int{Connected: len(tests), Disconnected: len(tests)})
}

// TestRefusals checks that a wrong key and an unknown box are refused in
// words that differ only by the user name the person typed.
func TestRefusals(t *testing.T) {
	e := newTestEnv(t)
	owner, stranger := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	e.backend.addBox("empty") // a box nobody may enter

	var messages []string
	for _, tt := range []struct {
		name, user string
		key        testKey
	}{
		{"wrong key", "dev", stranger},
		{"unknown box", "nosuch", owner},
		{"box without keys", "empty", owner},
	} {
		got := e.ssh(t, nil, []testKey{tt.key}, nil, tt.user, "echo in")
		if got.code != 255 || got.stdout != "" {
			t.Errorf("%s: got %+v, want a refusal", tt.name, got)
		}
		messages = append(messages, strings.ReplaceAll(got.stderr, tt.user+"@", "USER@"))
	}
	for _, m := range messages[1:] {
		if m != messages[0] {
			t.Errorf("refusals differ:\n%q\n%q", messages[0], m)
		}
	}
	if !strings.Contains(messages[0], "Permission denied (publickey)") {
		t.Errorf("refusal %q, want OpenSSH's permission denied", messages[0])
	}
	if n := e.backend.connectCount("dev") + e.backend.connectCount("nosuch") + e.backend.connectCount("empty"); n != 0 {
		t.Errorf("Connect called %d times for refused connections", n)
	}
	e.waitOutcomes(t, map[Outcome]int{Refused: 3})
}

// TestSecondKeyDecides checks that when the client offers a wrong key first,
// the connection is logged with the key that signed.
func TestSecondKeyDecides(t *testing.T) {
	e := newTestEnv(t)
	owner, stranger := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	e.backend.addBox("other", stranger.pub)

	got := e.ssh(t, nil, []testKey{stranger, owner}, nil, "dev", "echo in")
	if got != (result{stdout: "in\n"}) {
		t.Fatalf("got %+v", got)
	}
	connects := records(t, e.logs, "ssh connect")
	if len(connects) != 1 {
		t.Fatalf("%d connect records, want 1", len(connects))
	}
	if c := connects[0]; c["box"] != "dev" || c["key"] != ssh.FingerprintSHA256(owner.pub) {
		t.Errorf("connect record %v, want box dev and key %s", c, ssh.FingerprintSHA256(owner.pub))
	}
}

// impostor offers one public key and signs with another key, as a client
// does that shows a key it does not hold (CVE-2024-45337's attack).
type impostor struct {
	shown ssh.PublicKey
	ssh.Signer
}

func (i impostor) PublicKey() ssh.PublicKey { return i.shown }

// TestOfferedKeyGrantsNothing checks that offering an authorized public key
// without its private half, then signing with one's own key, gets nowhere.
func TestOfferedKeyGrantsNothing(t *testing.T) {
	e := newTestEnv(t)
	victim, attacker := newTestKey(t), newTestKey(t)
	e.backend.addBox("victim", victim.pub)
	e.backend.addBox("mine", attacker.pub)

	dial := func(user string, signers ...ssh.Signer) error {
		c, err := ssh.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", e.port), &ssh.ClientConfig{
			User:            user,
			Auth:            []ssh.AuthMethod{ssh.PublicKeys(signers...)},
			HostKeyCallback: ssh.InsecureIgnoreHostKey(),
			Timeout:         10 * time.Second,
		})
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := dial("mine", attacker.signer); err != nil {
		t.Fatalf("the attacker's own box: %v", err)
	}
	if err := dial("victim", impostor{victim.pub, attacker.signer}, attacker.signer); err == nil {
		t.Fatal("offering the victim's public key let the attacker in")
	}
	if n := e.backend.connectCount("victim"); n != 0 {
		t.Errorf("Connect called %d times for the victim's box", n)
	}
}

func TestSCPAndSFTP(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	boxDir := e.backend.addBox("dev", owner.pub)
	local := t.TempDir()
	data := make([]byte, 300<<10)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(local, "in.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(e.port)

	t.Run("scp", func(t *testing.T) {
		scp := func(from, to string) {
			t.Helper()
			args := append(e.opts(owner), "-P", port, from, to)
			got := run(t, nil, "scp", args...)
			if got.code != 0 {
				t.Fatalf("scp %s %s: %+v", from, to, got)
			}
		}
		scp(filepath.Join(local, "in.bin"), "dev@127.0.0.1:"+filepath.Join(boxDir, "scp.bin"))
		checkFile(t, filepath.Join(boxDir, "scp.bin"), data)
		scp("dev@127.0.0.1:"+filepath.Join(boxDir, "scp.bin"), filepath.Join(local, "scp-back.bin"))
		checkFile(t, filepath.Join(local, "scp-back.bin"), data)
	})
	t.Run("sftp", func(t *testing.T) {
		batch := fmt.Sprintf("cd %s\nput %s sftp.bin\nls -1\nget sftp.bin %s\n",
			boxDir, filepath.Join(local, "in.bin"), filepath.Join(local, "sftp-back.bin"))
		batchFile := filepath.Join(local, "batch")
		if err := os.WriteFile(batchFile, []byte(batch), 0o644); err != nil {
			t.Fatal(err)
		}
		args := append(e.opts(owner), "-P", port, "-b", batchFile, "dev@127.0.0.1")
		got := run(t, nil, "sftp", args...)
		if got.code != 0 || !strings.Contains(got.stdout, "sftp.bin") {
			t.Fatalf("sftp: %+v", got)
		}
		checkFile(t, filepath.Join(boxDir, "sftp.bin"), data)
		checkFile(t, filepath.Join(local, "sftp-back.bin"), data)
	})
}

func checkFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s: %d bytes differ from the %d sent", path, len(got), len(want))
	}
}

func TestForwarding(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "hello from the box's network\n")
	}))
	defer web.Close()
	webAddr := strings.TrimPrefix(web.URL, "http://")

	t.Run("local forward", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lport := l.Addr().(*net.TCPAddr).Port
		l.Close() // ssh listens here instead
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		args := append(e.opts(owner), "-p", strconv.Itoa(e.port), "-N", "-o", "ExitOnForwardFailure=yes",
			"-L", fmt.Sprintf("%d:%s", lport, webAddr), "dev@127.0.0.1")
		cmd := exec.CommandContext(ctx, "ssh", args...)
		var stderr testutil.LockedBuffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			cmd.Process.Kill()
			cmd.Wait()
		}()
		url := fmt.Sprintf("http://127.0.0.1:%d/", lport)
		var body []byte
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			resp, err := http.Get(url)
			if err == nil {
				body, err = io.ReadAll(resp.Body)
				resp.Body.Close()
				if err == nil {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("GET %s through ssh -L: %v (ssh: %s)", url, err, stderr.String())
			}
		}
		if string(body) != "hello from the box's network\n" {
			t.Errorf("body %q", body)
		}
	})
	t.Run("stdio forward", func(t *testing.T) {
		req := "GET / HTTP/1.0\r\nHost: box\r\n\r\n"
		got := e.ssh(t, strings.NewReader(req), []testKey{owner}, []string{"-W", webAddr}, "dev", "")
		if got.code != 0 || !strings.HasSuffix(got.stdout, "\r\n\r\nhello from the box's network\n") {
			t.Errorf("ssh -W: %+v", got)
		}
	})
	t.Run("refused by the box", func(t *testing.T) {
		extra := []string{"-o", "LogLevel=INFO", "-W", "127.0.0.1:1"}
		got := e.ssh(t, nil, []testKey{owner}, extra, "dev", "")
		if got.code != 255 || !strings.Contains(got.stderr, "connection refused") {
			t.Errorf("ssh -W to a closed port: %+v", got)
		}
	})
}

// startWaiter starts `ssh dev@... 'echo started; read line'` with its
// stdin held open and returns once the box has printed started. The
// command ends when the box's side of its stdin closes.
func (e *testEnv) startWaiter(t *testing.T, key testKey) (wait func() result) {
	t.Helper()
	args := append(e.opts(key), "-p", strconv.Itoa(e.port), "dev@127.0.0.1", "echo started; read line")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	cmd := exec.CommandContext(ctx, "ssh", args...)
	var stderr testutil.LockedBuffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if line != "started\n" {
		cancel()
		cmd.Wait()
		t.Fatalf("read %q, %v (ssh: %s)", line, err, stderr.String())
	}
	return func() result {
		defer cancel()
		defer stdin.Close()
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		if ctx.Err() != nil {
			t.Fatal("ssh did not end")
		}
		return result{stderr: stderr.String(), code: cmd.ProcessState.ExitCode()}
	}
}

func TestBoxLost(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	wait := e.startWaiter(t, owner)
	e.backend.cut("dev")
	got := wait()
	if got.code != 255 || !strings.Contains(got.stderr, "boxd: lost the connection to box dev") {
		t.Errorf("got %+v, want exit 255 and a message", got)
	}
	// The next connection reaches the box again (the backend reconnects).
	if got := e.ssh(t, nil, []testKey{owner}, nil, "dev", "echo back"); got != (result{stdout: "back\n"}) {
		t.Errorf("after reconnect: %+v", got)
	}
}

func TestConnectFails(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	e.backend.failConnect("dev", errors.New("resume failed: snapshot is missing"))
	// At OpenSSH's default log level, as people run it.
	got := e.ssh(t, nil, []testKey{owner}, []string{"-o", "LogLevel=INFO"}, "dev", "echo in")
	if got.code != 255 || !strings.Contains(got.stderr, "boxd: cannot reach box dev: resume failed: snapshot is missing") {
		t.Errorf("got %+v", got)
	}
	e.waitOutcomes(t, map[Outcome]int{Connected: 1, Unreachable: 1, Disconnected: 1})
}

func TestCloseEndsSessions(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	wait := e.startWaiter(t, owner)
	if err := e.server.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-e.served; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v", err)
	}
	e.served <- ErrServerClosed // for the cleanup's check
	if got := wait(); got.code == 0 {
		t.Errorf("ssh ended with %+v after Close", got)
	}
	if _, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", e.port)); err == nil {
		t.Error("the proxy still accepts connections after Close")
	}
}

// TestRequestsRefused checks what the proxy answers itself: channel types
// it does not relay, global requests it does not know or cannot parse, and
// X11 forwarding.
func TestRequestsRefused(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	c := e.dial(t, "dev", owner)
	for _, typ := range []string{"x11", "forwarded-tcpip", "auth-agent@openssh.com", "tun@openssh.com"} {
		_, _, err := c.OpenChannel(typ, nil)
		var oerr *ssh.OpenChannelError
		if !errors.As(err, &oerr) || oerr.Reason != ssh.UnknownChannelType {
			t.Errorf("open %s: %v, want unknown channel type", typ, err)
		}
	}
	for _, req := range []string{"keepalive@openssh.com", "tcpip-forward"} {
		ok, _, err := c.SendRequest(req, true, nil)
		if ok || err != nil {
			t.Errorf("%s: %v, %v, want false", req, ok, err)
		}
	}
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ok, err := s.SendRequest("x11-req", true, ssh.Marshal(struct {
		Single         bool
		Protocol, Auth string
		Screen         uint32
	}{false, "MIT-MAGIC-COOKIE-1", "00", 0})); ok || err != nil {
		t.Errorf("X11 forwarding: %v, %v, want false", ok, err)
	}
	out, err := s.Output("echo still works")
	if err != nil || string(out) != "still works\n" {
		t.Errorf("session after refusals: %q, %v", out, err)
	}
	// direct-tcpip that the box cannot connect: the box's reason comes back.
	if _, err := c.Dial("tcp", "127.0.0.1:1"); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("dial a closed port through the box: %v", err)
	}
}

// TestSignal checks that a signal request reaches the box and its
// exit-signal comes back, with the x/crypto client (OpenSSH's client sends
// no signals).
func TestSignal(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	c := e.dial(t, "dev", owner)
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	stdout, err := s.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start("echo started; exec sleep 60"); err != nil {
		t.Fatal(err)
	}
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "started\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	if err := s.Signal(ssh.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var ee *ssh.ExitError
	if err := s.Wait(); !errors.As(err, &ee) || ee.Signal() != "TERM" {
		t.Errorf("Wait: %v, want killed by TERM", err)
	}
}

// dial connects the x/crypto client to the proxy as user with key.
func (e *testEnv) dial(t *testing.T, user string, key testKey) *ssh.Client {
	t.Helper()
	c, err := ssh.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", e.port), &ssh.ClientConfig{
		User:            user,
		Auth:            []ssh.AuthMethod{ssh.PublicKeys(key.signer)},
		HostKeyCallback: ssh.InsecureIgnoreHostKey(),
		Timeout:         10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// records returns the JSON log records in b with message msg.
func records(t *testing.T, b *testutil.LockedBuffer, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for line := range strings.Lines(b.String()) {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// TestShortCommandsAnswered runs many short commands, one session each: a
// program that ends before the proxy has passed on the box's answer to its
// exec must still look started to the person, then exited, never closed
// under its start (which failed about one command in a hundred).
func TestShortCommandsAnswered(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	c := e.dial(t, "dev", owner)
	for i := range 300 {
		s, err := c.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		out, err := s.Output("echo " + strconv.Itoa(i))
		s.Close()
		if err != nil || string(out) != strconv.Itoa(i)+"\n" {
			t.Fatalf("command %d: %q, %v", i, out, err)
		}
	}
}
