package integration

// TestDaemonSSHForwarding is ssh -A and ssh -R through the front door into
// a real box, and what the daemon logs of a refused login.

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// sshWith is ssh with extra options before the usual ones.
func (d *daemonEnv) sshWith(t *testing.T, extra []string, key, box, command string) (string, string, int) {
	t.Helper()
	args := append(append(extra, d.sshOpts(key)...), "-p", d.port, box+"@127.0.0.1", command)
	cmd := exec.Command("ssh", args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), errb.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), 0
}

// fingerprint is the SHA256 fingerprint of the public key at path.
func fingerprint(t *testing.T, path string) string {
	t.Helper()
	out, err := exec.Command("ssh-keygen", "-l", "-E", "sha256", "-f", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	fp := regexp.MustCompile(`SHA256:\S+`).FindString(string(out))
	if fp == "" {
		t.Fatalf("no fingerprint in %q", out)
	}
	return fp
}

// hostSSHAdd copies this host's ssh-add and the libraries it links into box
// dev's /root/lib (the default image has no OpenSSH client; host and guest
// are both Debian bookworm), and returns the command line that runs it.
func (d *daemonEnv) hostSSHAdd(t *testing.T) string {
	t.Helper()
	tool, err := exec.LookPath("ssh-add")
	if err != nil {
		t.Skip("ssh-add is not installed")
	}
	out, err := exec.Command("ldd", tool).Output()
	if err != nil {
		t.Fatalf("ldd %s: %v", tool, err)
	}
	files := []string{tool}
	for _, m := range regexp.MustCompile(`=> (/\S+)`).FindAllStringSubmatch(string(out), -1) {
		if base := filepath.Base(m[1]); strings.HasPrefix(base, "libc.so") || strings.HasPrefix(base, "ld-linux") {
			continue // the guest's own
		}
		files = append(files, m[1])
	}
	if _, _, code := d.ssh(t, d.key, "dev", "mkdir -p /root/lib"); code != 0 {
		t.Fatal("mkdir /root/lib in the box failed")
	}
	args := append(d.sshOpts(d.key), "-P", d.port)
	args = append(args, files...)
	if out, err := exec.Command("scp", append(args, "dev@127.0.0.1:/root/lib/")...).CombinedOutput(); err != nil {
		t.Fatalf("scp ssh-add into the box: %v %s", err, out)
	}
	return "LD_LIBRARY_PATH=/root/lib /root/lib/ssh-add"
}

func TestDaemonSSHForwarding(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	d := newDaemonEnv(ctx, t)
	d.cli(t, "create", "dev", "--ssh-key", d.key+".pub")

	t.Run("agent", func(t *testing.T) {
		for _, tool := range []string{"ssh-agent", "ssh-keygen"} {
			if _, err := exec.LookPath(tool); err != nil {
				t.Skipf("%s is not installed", tool)
			}
		}
		sshAdd := d.hostSSHAdd(t)
		// An agent holding a key that is not the login key.
		sock := filepath.Join(t.TempDir(), "agent.sock")
		agent := exec.Command("ssh-agent", "-D", "-a", sock)
		if err := agent.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			_ = agent.Process.Kill()
			_ = agent.Wait()
		}()
		for i := 0; ; i++ {
			if _, err := os.Stat(sock); err == nil {
				break
			}
			if i > 200 {
				t.Fatal("ssh-agent made no socket")
			}
			time.Sleep(20 * time.Millisecond)
		}
		add := exec.Command("ssh-add", d.wrongKey)
		add.Env = append(os.Environ(), "SSH_AUTH_SOCK="+sock)
		if out, err := add.CombinedOutput(); err != nil {
			t.Fatalf("ssh-add: %v %s", err, out)
		}
		want := fingerprint(t, d.wrongKey+".pub")

		out, errOut, code := d.sshWith(t, []string{"-A", "-o", "IdentityAgent=" + sock}, d.key, "dev", sshAdd+" -l")
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("ssh -A, then ssh-add -l in the box: exit %d, %q %q; want %s", code, out, errOut, want)
		}
		out, _, _ = d.sshWith(t, []string{"-o", "IdentityAgent=" + sock}, d.key, "dev", `echo "sock=$SSH_AUTH_SOCK"`)
		if out != "sock=\n" {
			t.Errorf("without -A: %q, want no SSH_AUTH_SOCK", out)
		}
	})

	t.Run("remote forward", func(t *testing.T) {
		// The client's side: a service that greets and closes.
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte("hello from the client's side\n"))
				c.Close()
			}
		}()
		spec := "8080:" + l.Addr().String()
		// bash's /dev/tcp is the program in the box; the forward is in
		// place when the command starts.
		out, errOut, code := d.sshWith(t, []string{"-o", "ExitOnForwardFailure=yes", "-R", spec}, d.key, "dev",
			`bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && cat <&3'`)
		if code != 0 || out != "hello from the client's side\n" {
			t.Fatalf("ssh -R %s, a connection in the box: exit %d, %q %q", spec, code, out, errOut)
		}
	})

	t.Run("refusal logged", func(t *testing.T) {
		if _, _, code := d.ssh(t, d.wrongKey, "dev", "true"); code != 255 {
			t.Fatalf("a wrong key: exit %d", code)
		}
		want := fingerprint(t, d.wrongKey+".pub")
		for i := 0; ; i++ {
			log, _ := os.ReadFile(filepath.Join(d.root, "daemon.log"))
			var found bool
			for line := range strings.Lines(string(log)) {
				if strings.Contains(line, "ssh login refused") && strings.Contains(line, "dev") && strings.Contains(line, want) {
					found = true
				}
			}
			if found {
				break
			}
			if i > 100 {
				t.Fatalf("no refusal naming box dev and key %s in the daemon's log:\n%s", want, log)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}
