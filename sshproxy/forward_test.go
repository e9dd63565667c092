package sshproxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"golang.org/x/crypto/ssh"
)

// The test backend's boxes run on this host, so a program "in the box" may
// be the test itself dialing this host's ports.

// freePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// get fetches url, retrying until deadline, and returns the body.
func get(t *testing.T, url string, deadline time.Duration) string {
	t.Helper()
	var lastErr error
	for end := time.Now().Add(deadline); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		resp, err := http.Get(url)
		if err != nil {
			lastErr = err
			continue
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err == nil {
			return string(body)
		}
		lastErr = err
	}
	t.Fatalf("GET %s: %v", url, lastErr)
	return ""
}

// waitRefused waits until nothing listens on addr.
func waitRefused(t *testing.T, addr string) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(end) {
			t.Fatalf("%s still accepts connections", addr)
		}
	}
}

// background starts `ssh [extra] [opts] user@127.0.0.1 command` and ends it
// at the test's end; stderr collects its messages.
func (e *testEnv) background(t *testing.T, keys []testKey, extra []string, user, command string) (stderr *testutil.LockedBuffer) {
	t.Helper()
	args := append(slices.Clone(extra), e.opts(keys...)...)
	args = append(args, "-p", strconv.Itoa(e.port), user+"@127.0.0.1")
	if command != "" {
		args = append(args, command)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	cmd := exec.CommandContext(ctx, "ssh", args...)
	stderr = &testutil.LockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		cancel()
	})
	return stderr
}

// nonLoopback returns an IPv4 address of this host that is not loopback,
// or "" when it has none.
func nonLoopback() string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String()
		}
	}
	return ""
}

// TestRemoteForward checks ssh -R through the front door: a program in the
// box connecting to the forwarded port reaches what the client's side
// forwards to.
func TestRemoteForward(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed")
	}
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	// The service on the client's side.
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "hello from the client's side\n")
	}))
	defer web.Close()
	webAddr := strings.TrimPrefix(web.URL, "http://")

	t.Run("the command uses the port", func(t *testing.T) {
		// The forward is in place when the session's command starts, as
		// with OpenSSH's sshd: no retries in the box.
		port := freePort(t)
		extra := []string{"-o", "ExitOnForwardFailure=yes", "-R", fmt.Sprintf("%d:%s", port, webAddr)}
		got := e.ssh(t, nil, []testKey{owner}, extra, "dev", fmt.Sprintf("curl -sS http://localhost:%d/", port))
		if got != (result{stdout: "hello from the client's side\n"}) {
			t.Fatalf("curl in the box: %+v", got)
		}
		// The person left: the box listens no more.
		waitRefused(t, fmt.Sprintf("127.0.0.1:%d", port))
	})

	t.Run("loopback unless asked", func(t *testing.T) {
		other := nonLoopback()
		if other == "" {
			t.Skip("this host has no address but loopback")
		}
		port, wide := freePort(t), freePort(t)
		stderr := e.background(t, []testKey{owner}, []string{"-N", "-o", "ExitOnForwardFailure=yes",
			"-R", fmt.Sprintf("%d:%s", port, webAddr),
			"-R", fmt.Sprintf("0.0.0.0:%d:%s", wide, webAddr)}, "dev", "")
		if body := get(t, fmt.Sprintf("http://127.0.0.1:%d/", port), 20*time.Second); body != "hello from the client's side\n" {
			t.Fatalf("body %q (ssh: %s)", body, stderr)
		}
		if body := get(t, fmt.Sprintf("http://[::1]:%d/", port), 5*time.Second); body != "hello from the client's side\n" {
			t.Errorf("over ::1: body %q", body)
		}
		if c, err := net.DialTimeout("tcp", net.JoinHostPort(other, strconv.Itoa(port)), time.Second); err == nil {
			c.Close()
			t.Errorf("ssh -R %d: the box listens on %s too", port, other)
		}
		if body := get(t, fmt.Sprintf("http://%s/", net.JoinHostPort(other, strconv.Itoa(wide))), 5*time.Second); body != "hello from the client's side\n" {
			t.Errorf("ssh -R 0.0.0.0:%d: body %q", wide, body)
		}
	})

	t.Run("keepalives while the box resumes", func(t *testing.T) {
		// An OpenSSH client that sends keepalives (ServerAliveInterval) while its remote forward waits for
		// a box that resumes gets each reply in its turn: SSH matches the replies to global requests by
		// their order, and a keepalive answered ahead of the forward would be taken for its refusal.
		e.backend.addBox("slow", owner.pub)
		e.backend.slowConnect("slow", 3500*time.Millisecond) // three keepalive intervals
		port := freePort(t)
		extra := []string{"-o", "ServerAliveInterval=1", "-o", "ExitOnForwardFailure=yes", "-R", fmt.Sprintf("%d:%s", port, webAddr)}
		got := e.ssh(t, nil, []testKey{owner}, extra, "slow", fmt.Sprintf("curl -sS http://localhost:%d/", port))
		if got != (result{stdout: "hello from the client's side\n"}) {
			t.Fatalf("curl in the box: %+v", got)
		}
	})

	t.Run("allocated port", func(t *testing.T) {
		stderr := e.background(t, []testKey{owner}, []string{"-N", "-o", "LogLevel=INFO", "-R", "0:" + webAddr}, "dev", "")
		allocated := regexp.MustCompile(`Allocated port ([0-9]+) for remote forward`)
		var port string
		for end := time.Now().Add(20 * time.Second); port == ""; time.Sleep(50 * time.Millisecond) {
			if m := allocated.FindStringSubmatch(stderr.String()); m != nil {
				port = m[1]
			} else if time.Now().After(end) {
				t.Fatalf("ssh said no allocated port: %s", stderr)
			}
		}
		if body := get(t, "http://127.0.0.1:"+port+"/", 5*time.Second); body != "hello from the client's side\n" {
			t.Errorf("body %q", body)
		}
	})

	t.Run("cancel", func(t *testing.T) {
		c := e.dial(t, "dev", owner)
		l, err := c.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		// http.Serve closes its listener when it ends: once this test's
		// Close below has ended it, a second cancel-tcpip-forward that may
		// overtake the test's, which is then refused. It gets a listener
		// whose Close does nothing.
		go http.Serve(keepOpen{l}, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			io.WriteString(w, "through the x/crypto client\n")
		}))
		addr := l.Addr().String()
		if body := get(t, "http://"+addr+"/", 5*time.Second); body != "through the x/crypto client\n" {
			t.Fatalf("body %q", body)
		}
		// Another connection to the box can neither cancel it nor take
		// its channels.
		intruder := e.dial(t, "dev", owner)
		port := uint32(l.Addr().(*net.TCPAddr).Port)
		if ok, _, err := intruder.SendRequest("cancel-tcpip-forward", true, ssh.Marshal(forwardMsg{Addr: "127.0.0.1", Port: port})); ok || err != nil {
			t.Errorf("another connection's cancel: %v, %v, want false", ok, err)
		}
		if body := get(t, "http://"+addr+"/", 5*time.Second); body != "through the x/crypto client\n" {
			t.Fatalf("after another's cancel: body %q", body)
		}
		if err := l.Close(); err != nil { // cancel-tcpip-forward
			t.Fatal(err)
		}
		waitRefused(t, addr)
	})
}

// startAgent starts an ssh-agent holding keys and returns its socket.
func startAgent(t *testing.T, keys ...testKey) string {
	t.Helper()
	for _, tool := range []string{"ssh-agent", "ssh-add"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed", tool)
		}
	}
	sock := t.TempDir() + "/agent.sock"
	cmd := exec.Command("ssh-agent", "-D", "-a", sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(end) {
			t.Fatal("ssh-agent made no socket")
		}
	}
	for _, k := range keys {
		add := exec.Command("ssh-add", k.path)
		add.Env = append(os.Environ(), "SSH_AUTH_SOCK="+sock)
		if out, err := add.CombinedOutput(); err != nil {
			t.Fatalf("ssh-add: %v: %s", err, out)
		}
	}
	return sock
}

// TestAgentForward checks ssh -A through the front door: the box sees the
// client's agent, for that session only, and an ssh in the box logs in with
// its key.
func TestAgentForward(t *testing.T) {
	e := newTestEnv(t)
	owner, forwarded := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	e.backend.addBox("other", forwarded.pub) // only the agent's key opens it
	sock := startAgent(t, forwarded)
	// The agent at hand (IdentitiesOnly in e.opts keeps its key out of
	// the login), forwarded with -A.
	withAgent := []string{"-A", "-o", "IdentityAgent=" + sock}

	t.Run("ssh-add lists the key", func(t *testing.T) {
		got := e.ssh(t, nil, []testKey{owner}, withAgent, "dev", `ssh-add -l; echo "sock=$SSH_AUTH_SOCK"`)
		fp := ssh.FingerprintSHA256(forwarded.pub)
		if got.code != 0 || !strings.Contains(got.stdout, fp) {
			t.Fatalf("ssh-add -l in the box: %+v, want %s", got, fp)
		}
		// The session's socket goes with the session.
		m := regexp.MustCompile(`sock=(/\S+)`).FindStringSubmatch(got.stdout)
		if m == nil {
			t.Fatalf("no SSH_AUTH_SOCK in %q", got.stdout)
		}
		for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if _, err := os.Stat(m[1]); os.IsNotExist(err) {
				break
			}
			if time.Now().After(end) {
				t.Fatalf("%s outlived its session", m[1])
			}
		}
	})

	t.Run("ssh in the box logs in with it", func(t *testing.T) {
		inner := fmt.Sprintf("ssh -F none -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "+
			"-o LogLevel=ERROR -p %d other@127.0.0.1 echo in other with the forwarded key", e.port)
		got := e.ssh(t, nil, []testKey{owner}, withAgent, "dev", inner)
		if got != (result{stdout: "in other with the forwarded key\n"}) {
			t.Errorf("ssh from the box: %+v", got)
		}
	})

	t.Run("not asked, not forwarded", func(t *testing.T) {
		// The same client, agent at hand, without -A; and a session of a
		// connection that forwards it, beside one that does not ask.
		got := e.ssh(t, nil, []testKey{owner}, []string{"-o", "IdentityAgent=" + sock}, "dev", `echo "sock=$SSH_AUTH_SOCK"; ssh-add -l`)
		if got.stdout != "sock=\n" || got.code != 2 {
			t.Errorf("without -A: %+v, want no SSH_AUTH_SOCK and ssh-add exit 2", got)
		}
		c := e.dial(t, "dev", owner)
		s, err := c.NewSession()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if out, err := s.Output(`echo "sock=$SSH_AUTH_SOCK"`); err != nil || string(out) != "sock=\n" {
			t.Errorf("a session that did not ask: %q, %v", out, err)
		}
	})
}

// keepOpen is a listener whose Close leaves it open, for a server that
// must not close it.
type keepOpen struct{ net.Listener }

func (keepOpen) Close() error { return nil }
