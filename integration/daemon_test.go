package integration

// TestDaemonSSH is the front door end to end: boxd daemon, the box
// commands, and the real OpenSSH client through boxd's SSH proxy.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

type daemonEnv struct {
	root, boxd, port string
	cmd              *exec.Cmd
	env              []string
	key, wrongKey    string
}

func (d *daemonEnv) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(d.boxd, "--root", d.root, "daemon", "--ssh-listen", "127.0.0.1:"+d.port, "--idle-hibernate", "0")
	cmd.Env = d.env
	log, err := os.OpenFile(filepath.Join(d.root, "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.cmd = cmd
	for i := 0; ; i++ {
		if _, err := os.Stat(filepath.Join(d.root, "boxd.sock")); err == nil {
			if c, err := net.Dial("tcp", "127.0.0.1:"+d.port); err == nil {
				c.Close()
				return
			}
		}
		if i > 300 {
			b, _ := os.ReadFile(filepath.Join(d.root, "daemon.log"))
			t.Fatalf("the daemon did not come up:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *daemonEnv) stop(t *testing.T) {
	t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- d.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the daemon exited: %v", err)
		}
	case <-time.After(2 * time.Minute):
		_ = d.cmd.Process.Kill()
		t.Error("the daemon did not stop on SIGTERM")
	}
	d.cmd = nil
}

// cli runs a boxd command and returns its stdout; it fails the test on a
// non-zero exit.
func (d *daemonEnv) cli(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(d.boxd, append([]string{"--root", d.root}, args...)...)
	cmd.Env = d.env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("boxd %s: %v\n%s", strings.Join(args, " "), err, errb.String())
	}
	return out.String()
}

// ssh runs a command in box as user through the front door with key; it
// returns stdout, stderr and the exit code.
func (d *daemonEnv) ssh(t *testing.T, key, box string, command ...string) (string, string, int) {
	t.Helper()
	args := append(d.sshOpts(key), "-p", d.port, box+"@127.0.0.1")
	cmd := exec.Command("ssh", append(args, command...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out.String()), errb.String(), code
}

func (d *daemonEnv) sshOpts(key string) []string {
	return []string{"-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i", key}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

func sshKeygen(t *testing.T, path string) {
	t.Helper()
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
}

// newDaemonEnv builds boxd, the agent and the default image in a fresh
// root, makes two keys and starts the daemon, which the test's end stops.
func newDaemonEnv(ctx context.Context, t *testing.T) *daemonEnv {
	t.Helper()
	e := newBoxEnv(ctx, t) // builds the agent and the image; its manager is closed below
	ensurePackages(t, "openssh-client")
	if err := e.mgr.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.g.Close(); err != nil { // the daemon owns the store from here
		t.Fatal(err)
	}
	d := &daemonEnv{root: e.root, port: freePort(t), env: os.Environ()}
	d.boxd = filepath.Join(e.root, "boxd")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", d.boxd, "github.com/boxd-dev/boxd/cmd/boxd").CombinedOutput(); err != nil {
		t.Fatalf("building boxd: %v\n%s", err, out)
	}
	d.key, d.wrongKey = filepath.Join(e.root, "key"), filepath.Join(e.root, "wrong")
	sshKeygen(t, d.key)
	sshKeygen(t, d.wrongKey)
	d.start(t)
	t.Cleanup(func() { d.stop(t) })
	return d
}

func TestDaemonSSH(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	d := newDaemonEnv(ctx, t)

	d.cli(t, "create", "dev", "--ssh-key", d.key+".pub")
	if out, _, code := d.ssh(t, d.key, "dev", "echo", "hello"); out != "hello" || code != 0 {
		t.Fatalf("ssh echo: %q %d", out, code)
	}
	if _, _, code := d.ssh(t, d.key, "dev", "exit 3"); code != 3 {
		t.Fatalf("ssh exit 3: exit %d", code)
	}

	// scp in and back.
	local := filepath.Join(d.root, "local.bin")
	data := bytes.Repeat([]byte("boxd scp\n"), 20000)
	if err := os.WriteFile(local, data, 0o644); err != nil {
		t.Fatal(err)
	}
	scp := func(from, to string) {
		t.Helper()
		args := append(d.sshOpts(d.key), "-P", d.port, from, to)
		if out, err := exec.Command("scp", args...).CombinedOutput(); err != nil {
			t.Fatalf("scp %s %s: %v %s", from, to, err, out)
		}
	}
	scp(local, "dev@127.0.0.1:/root/in.bin")
	scp("dev@127.0.0.1:/root/in.bin", local+".back")
	if back, _ := os.ReadFile(local + ".back"); !bytes.Equal(back, data) {
		t.Fatal("scp round trip changed the file")
	}

	// A background process, then a fork.
	d.ssh(t, d.key, "dev", counter)
	time.Sleep(time.Second)
	d.cli(t, "fork", "dev", "f1")
	time.Sleep(600 * time.Millisecond)
	for _, n := range []string{"dev", "f1"} {
		out, _, code := d.ssh(t, d.key, n, "head -n 1 /tmp/count; tail -n 1 /tmp/count; cat /root/in.bin | wc -c")
		lines := strings.Fields(out)
		if code != 0 || len(lines) != 3 || lines[0] != "0" || lines[1] == "0" || lines[2] != strconv.Itoa(len(data)) {
			t.Fatalf("%s after the fork: %q (exit %d)", n, out, code)
		}
	}
	d.ssh(t, d.key, "f1", "echo fork > /root/fork.txt")
	if _, _, code := d.ssh(t, d.key, "dev", "test -e /root/fork.txt"); code != 1 {
		t.Fatalf("the fork's file is in the parent (test -e exit %d)", code)
	}

	// Hibernate; ssh wakes the box and the process is still there.
	d.cli(t, "hibernate", "dev")
	if ls := d.cli(t, "ls"); !strings.Contains(ls, "hibernated") {
		t.Fatalf("boxd ls after hibernate:\n%s", ls)
	}
	before, _, _ := d.ssh(t, d.key, "dev", "tail -n 1 /tmp/count")
	time.Sleep(600 * time.Millisecond)
	after, _, _ := d.ssh(t, d.key, "dev", "tail -n 1 /tmp/count")
	if a, _ := strconv.Atoi(after); a <= mustAtoi(t, before) {
		t.Fatalf("the counter after waking: %s then %s", before, after)
	}

	// A wrong key and an unknown box get the same refusal.
	_, wrongErr, wrongCode := d.ssh(t, d.wrongKey, "dev", "true")
	_, unknownErr, unknownCode := d.ssh(t, d.key, "nobox", "true")
	// The client names the user it tried; the server's refusal is what must match.
	wrongErr = strings.Replace(wrongErr, "dev@", "USER@", 1)
	unknownErr = strings.Replace(unknownErr, "nobox@", "USER@", 1)
	if wrongCode != 255 || unknownCode != 255 || wrongErr != unknownErr {
		t.Fatalf("refusals differ: wrong key %d %q, unknown box %d %q", wrongCode, wrongErr, unknownCode, unknownErr)
	}

	// Restart the daemon: nothing is lost.
	d.stop(t)
	d.start(t)
	ls := d.cli(t, "ls")
	for _, n := range []string{"dev", "f1"} {
		if !strings.Contains(ls, n) {
			t.Fatalf("box %s missing after a restart:\n%s", n, ls)
		}
	}
	if out, _, _ := d.ssh(t, d.key, "f1", "cat /root/fork.txt; head -n 1 /tmp/count"); out != fmt.Sprintf("fork\n%d", 0) {
		t.Fatalf("f1 after a daemon restart: %q", out)
	}
	// kill -9 of the daemon: its QEMUs die with it and leave their memory
	// files; the next daemon on the root reclaims every one of them, and
	// the boxes come back stopped, their disks kept.
	mem := memFolder(t, d.root)
	if files := memFiles(t, mem); len(files) == 0 {
		t.Fatalf("no memory files in %s while boxes run", mem)
	}
	states := map[string]string{}
	for _, b := range d.boxes(t) {
		states[b.Name] = b.State
	}
	if states["f1"] != "running" {
		t.Fatalf("f1 before the daemon is killed: %s, want running", states["f1"])
	}
	killedPID := d.cmd.Process.Pid
	if dirs, _ := filepath.Glob(filepath.Join(d.root, "run", fmt.Sprintf("qemu-%d-*", killedPID))); len(dirs) == 0 {
		t.Fatalf("no machine folders of the daemon (pid %d) in %s/run while boxes run", killedPID, d.root)
	}
	_ = d.cmd.Process.Kill()
	_ = d.cmd.Wait()
	d.cmd = nil
	d.start(t)
	if files := memFiles(t, mem); len(files) != 0 {
		t.Fatalf("memory files of the killed daemon left in %s: %v", mem, files)
	}
	if stale, _ := filepath.Glob(filepath.Join(d.root, "run", fmt.Sprintf("qemu-%d-*", killedPID))); len(stale) != 0 {
		t.Fatalf("machine folders of the killed daemon left: %v", stale)
	}
	for _, b := range d.boxes(t) {
		want := states[b.Name]
		if want == "running" {
			want = "stopped"
			if !strings.Contains(b.Note, "boxd stopped while the box ran") {
				t.Errorf("box %s after the daemon was killed: no reason in its note %q", b.Name, b.Note)
			}
		}
		if b.State != want {
			t.Fatalf("box %s after the daemon was killed: %s, want %s (it was %s)", b.Name, b.State, want, states[b.Name])
		}
	}
	if out, _, _ := d.ssh(t, d.key, "f1", "hostname"); out != "f1" {
		t.Fatalf("f1 after a kill -9 of the daemon and a cold boot: %q", out)
	}
	d.cli(t, "rm", "f1")
	if ls := d.cli(t, "ls"); strings.Contains(ls, "f1") {
		t.Fatalf("f1 still listed after rm:\n%s", ls)
	}
}

// boxes lists the daemon's boxes (boxd ls --json).
func (d *daemonEnv) boxes(t *testing.T) []struct{ Name, State, Note string } {
	t.Helper()
	var boxes []struct{ Name, State, Note string }
	if err := json.Unmarshal([]byte(d.cli(t, "ls", "--json")), &boxes); err != nil {
		t.Fatal(err)
	}
	return boxes
}

// memFolder is the memory folder in /dev/shm whose owner file names root.
func memFolder(t *testing.T, root string) string {
	t.Helper()
	owners, _ := filepath.Glob("/dev/shm/boxd-*/owner")
	for _, o := range owners {
		b, err := os.ReadFile(o)
		if f := strings.Fields(string(b)); err == nil && len(f) == 2 && f[1] == root {
			return filepath.Dir(o)
		}
	}
	t.Fatalf("no memory folder in /dev/shm names root %s", root)
	return ""
}

// memFiles lists the files in the memory folder mem but its owner file.
func memFiles(t *testing.T, mem string) []string {
	t.Helper()
	entries, err := os.ReadDir(mem)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if e.Name() != "owner" {
			out = append(out, e.Name())
		}
	}
	return out
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return n
}
