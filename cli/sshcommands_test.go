package cli_test

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// sshKey is a key pair made by OpenSSH's ssh-keygen.
type sshKey struct {
	path, fingerprint string
}

func newSSHKey(t *testing.T, name string) sshKey {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", path).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v %s", err, out)
	}
	out, err := exec.Command("ssh-keygen", "-l", "-E", "sha256", "-f", path+".pub").Output()
	if err != nil {
		t.Fatalf("ssh-keygen -l: %v", err)
	}
	return sshKey{path: path, fingerprint: strings.Fields(string(out))[1]}
}

// frontDoor runs OpenSSH's ssh through a daemon's SSH front door.
type frontDoor struct {
	port string
}

// ssh runs `ssh -p PORT user@127.0.0.1 command` with key alone.
func (f frontDoor) ssh(t *testing.T, key sshKey, user string, command ...string) result {
	t.Helper()
	args := []string{"-F", "none", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
		"-i", key.path, "-p", f.port, user + "@127.0.0.1"}
	cmd := exec.Command("ssh", append(args, command...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ee := (*exec.ExitError)(nil); err != nil && !errors.As(err, &ee) {
		t.Fatalf("ssh: %v", err)
	}
	return result{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
}

// startDaemonSSH runs `boxd daemon` on root and returns it and its SSH
// front door once it serves.
func startDaemonSSH(t *testing.T, root string) (*exec.Cmd, frontDoor) {
	t.Helper()
	cmd := command(root, "daemon", "--ssh-listen", "127.0.0.1:0", "--idle-hibernate", "0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			qemu.KillMachines(filepath.Join(root, "run")) // they outlive the daemon
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("boxd daemon said nothing: %v", err)
	}
	_, addr, ok := strings.Cut(strings.TrimSpace(line), ", SSH on ")
	_, port, err := net.SplitHostPort(addr)
	if !ok || err != nil {
		t.Fatalf("boxd daemon said %q", line)
	}
	return cmd, frontDoor{port: port}
}

// TestSSHCommandsQEMU runs boxd's commands over SSH with the OpenSSH client
// against the real daemon, whose boxes boot under QEMU: a registered key
// makes a box, forks it, lists, hibernates and removes its boxes and logs
// in to them; another registered key sees none of them and may touch none;
// an unregistered key is refused as a wrong key is; a command outside the
// list exits 2; exit codes are the CLI's.
func TestSSHCommandsQEMU(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Skip("the OpenSSH client (ssh) is not installed")
	}
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d, door := startDaemonSSH(t, root)
	t.Cleanup(func() {
		for _, n := range []string{"dev", "dev-copy"} {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	alice, bob, stranger := newSSHKey(t, "alice"), newSSHKey(t, "bob"), newSSHKey(t, "stranger")

	// The operator registers alice and bob.
	for _, k := range []sshKey{alice, bob} {
		if r := ok(t, root, "keys", "add", k.path+".pub"); !strings.Contains(r.stdout, "registered key "+k.fingerprint) {
			t.Fatalf("keys add: %q", r.stdout)
		}
	}
	fails(t, 4, root, []string{"key " + alice.fingerprint + " is registered already"}, "keys", "add", alice.path+".pub")
	fails(t, 2, root, []string{"line 1 starts a private key"}, "keys", "add", alice.path)
	fails(t, 3, root, []string{"no registered key has fingerprint SHA256:nosuch"}, "keys", "rm", "SHA256:nosuch")

	// alice makes a box over SSH and logs in to it.
	r := door.ssh(t, alice, "boxd", "create", "dev", "--image", boxtest.Image, "--memory", "256M")
	if r.code != 0 || !strings.HasPrefix(r.stdout, "box dev is running (image "+boxtest.Image+", 256 MiB, 1 vCPU)") ||
		!strings.HasSuffix(r.stdout, "log in with: ssh -p "+door.port+" dev@127.0.0.1\n") {
		t.Fatalf("create over SSH: %v", r)
	}
	if r := door.ssh(t, alice, "dev", "echo", "in dev"); r.code != 0 || r.stdout != "in dev\n" {
		t.Fatalf("ssh dev@: %v", r)
	}
	if r := door.ssh(t, alice, "dev", "echo fork-me > /root/mark"); r.code != 0 {
		t.Fatalf("ssh dev@: %v", r)
	}

	// Her fork is hers: she lists both and logs in to the fork.
	if r := door.ssh(t, alice, "boxd", "fork", "dev", "dev-copy"); r.code != 0 || !strings.HasPrefix(r.stdout, "forked dev into dev-copy") {
		t.Fatalf("fork over SSH: %v", r)
	}
	if r := door.ssh(t, alice, "dev-copy", "cat", "/root/mark"); r.code != 0 || r.stdout != "fork-me\n" {
		t.Fatalf("ssh dev-copy@: %v", r)
	}
	r = door.ssh(t, alice, "boxd", "ls")
	if lines := strings.Split(strings.TrimSpace(r.stdout), "\n"); r.code != 0 || len(lines) != 3 ||
		!strings.HasPrefix(lines[0], "NAME ") || !strings.HasPrefix(lines[1], "dev ") || !strings.HasPrefix(lines[2], "dev-copy ") {
		t.Fatalf("ls over SSH: %v", r)
	}
	var boxes []struct {
		Name, State, Parent, Owner string
	}
	decodeJSON(t, door.ssh(t, alice, "boxd", "ls", "--json").stdout, &boxes)
	if len(boxes) != 2 || boxes[0].Name != "dev" || boxes[1].Name != "dev-copy" || boxes[1].Parent != "dev" ||
		boxes[0].Owner != alice.fingerprint || boxes[1].Owner != alice.fingerprint {
		t.Fatalf("ls --json over SSH: %+v", boxes)
	}
	// The host sees them, and whose they are.
	var keys []struct {
		Fingerprint string
		Boxes       int
	}
	decodeJSON(t, ok(t, root, "keys", "ls", "--json").stdout, &keys)
	if len(keys) != 2 || keys[0].Fingerprint != alice.fingerprint || keys[0].Boxes != 2 || keys[1].Boxes != 0 {
		t.Fatalf("keys ls --json: %+v", keys)
	}

	// bob sees none of them and touches none: each is "no such box", in
	// the words of a box that does not exist.
	if r := door.ssh(t, bob, "boxd", "ls"); r.code != 0 || strings.TrimSpace(r.stdout) != "NAME  STATE  RUNNER  IMAGE  MEMORY  CPUS  FORKED FROM  CREATED" {
		t.Fatalf("bob's ls: %v", r)
	}
	if r := door.ssh(t, bob, "boxd", "ls", "--json"); r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("bob's ls --json: %v", r)
	}
	for _, args := range [][]string{{"rm", "dev"}, {"fork", "dev", "mine"}, {"hibernate", "dev-copy"}, {"snapshots", "dev"}, {"report", "dev"}} {
		r := door.ssh(t, bob, "boxd", args...)
		missing := door.ssh(t, bob, "boxd", append(slices.Clone(args[:1]), append([]string{"nosuch"}, args[2:]...)...)...)
		if r.code != 3 || r.stdout != "" || r.stderr != strings.ReplaceAll(missing.stderr, "nosuch", args[1]) ||
			!strings.HasPrefix(r.stderr, `boxd: "`+args[1]+`": no such box`) {
			t.Errorf("bob's %s: %v\n(a box that does not exist: %v)", strings.Join(args, " "), r, missing)
		}
	}
	// Nor can he log in to them: refused as a stranger is.
	refusal := strings.ReplaceAll(door.ssh(t, stranger, "dev", "true").stderr, "dev@", "USER@")
	if !strings.Contains(refusal, "Permission denied (publickey)") {
		t.Fatalf("a stranger's refusal: %q", refusal)
	}
	for _, tc := range []struct {
		key  sshKey
		user string
	}{{bob, "dev"}, {bob, "dev-copy"}, {stranger, "boxd"}} {
		r := door.ssh(t, tc.key, tc.user, "ls")
		if r.code != 255 || r.stdout != "" || strings.ReplaceAll(r.stderr, tc.user+"@", "USER@") != refusal {
			t.Errorf("%s as %s: %v; want the refusal of a wrong key, %q", tc.key.path, tc.user, r, refusal)
		}
	}

	// A command outside the list exits 2 with one line; exit codes are
	// the CLI's.
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"exec", "dev", "--", "true"}, 2, `boxd: "exec" is not one of the commands boxd runs over SSH`},
		{[]string{"keys", "ls"}, 2, `boxd: "keys" is not one of the commands boxd runs over SSH`},
		{[]string{"create", "x", "--ssh-key", "/etc/passwd"}, 2, "boxd: create: --ssh-key is not a flag boxd takes over SSH"},
		{[]string{"ls;", "rm", "dev"}, 2, `boxd: ";" in the command is shell syntax`},
		{[]string{"rm", "nosuch"}, 3, `boxd: "nosuch": no such box: not found`},
		{[]string{"create", "dev"}, 4, `boxd: "dev": box already exists`},
		{[]string{"create", "Bad_Name"}, 2, `boxd: box name "Bad_Name"`},
		{[]string{"fork", "dev", "boxd"}, 2, `boxd: box name "boxd" is the SSH front door's user`},
		// The flags allowed over SSH are the CLI's own.
		{[]string{"fork", "dev", "f", "--count", "0"}, 2, "boxd: --count 0: want 1 to 4096"},
		{[]string{"create", "x", "--cpus=0"}, 2, "boxd: --cpus 0: want 1 to 64"},
		{[]string{"create", "x", "--memory", "1K"}, 2, "boxd: --memory 1K: want a whole number of MiB"},
	} {
		r := door.ssh(t, alice, "boxd", tc.args...)
		if r.code != tc.code || r.stdout != "" || !strings.HasPrefix(r.stderr, tc.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("%s: %v; want exit %d and one line %q", strings.Join(tc.args, " "), r, tc.code, tc.want)
		}
	}

	// alice hibernates, resumes and removes her boxes.
	if r := door.ssh(t, alice, "boxd", "hibernate", "dev-copy", "--json"); r.code != 0 || !strings.Contains(r.stdout, `"state": "hibernated"`) {
		t.Fatalf("hibernate over SSH: %v", r)
	}
	if r := door.ssh(t, alice, "boxd", "resume", "dev-copy"); r.code != 0 || !strings.HasPrefix(r.stdout, "box dev-copy is running") {
		t.Fatalf("resume over SSH: %v", r)
	}
	if r := door.ssh(t, alice, "dev-copy", "cat", "/root/mark"); r.code != 0 || r.stdout != "fork-me\n" {
		t.Fatalf("ssh dev-copy@ after resume: %v", r)
	}
	var snaps []struct{ Box string }
	decodeJSON(t, door.ssh(t, alice, "boxd", "snapshots", "--json").stdout, &snaps)
	if len(snaps) != 2 {
		t.Errorf("snapshots --json over SSH: %+v", snaps)
	}
	for _, n := range []string{"dev-copy", "dev"} {
		if r := door.ssh(t, alice, "boxd", "rm", n); r.code != 0 || r.stdout != "removed box "+n+"\n" {
			t.Fatalf("rm over SSH: %v", r)
		}
	}
	if r := door.ssh(t, alice, "boxd", "ls", "--json"); r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Fatalf("ls --json after rm: %v", r)
	}

	// An unregistered key is refused from then on.
	ok(t, root, "keys", "rm", bob.fingerprint)
	if r := door.ssh(t, bob, "boxd", "ls"); r.code != 255 || strings.ReplaceAll(r.stderr, "boxd@", "USER@") != refusal {
		t.Fatalf("a key no longer registered: %v", r)
	}
}
