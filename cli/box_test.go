package cli_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// shortRoot returns a root whose socket path fits a unix socket's limit.
func shortRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "boxd-cli-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestBoxCommandsRefuseBadInput(t *testing.T) {
	root := shortRoot(t)
	keyDir := t.TempDir()
	goodKey := filepath.Join(keyDir, "good.pub")
	if err := os.WriteFile(goodKey, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	badKey := filepath.Join(keyDir, "bad.pub")
	if err := os.WriteFile(badKey, []byte("ssh-ed25519 not-base64\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	privKey := filepath.Join(keyDir, "id")
	if err := os.WriteFile(privKey, []byte("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n-----END OPENSSH PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	notRunning := fmt.Sprintf("boxd daemon is not running on %s (start it with: boxd daemon --root %s)", root, root)
	for _, tc := range []struct {
		code int
		want []string
		args []string
	}{
		{2, []string{`box name "Dev"`}, []string{"create", "Dev"}},
		{2, []string{`box name "-dev"`}, []string{"create", "--", "-dev"}},
		{2, []string{`box name "` + strings.Repeat("a", 64) + `"`}, []string{"create", strings.Repeat("a", 64)}},
		{2, []string{"usage: boxd create NAME"}, []string{"create"}},
		{2, []string{"usage: boxd create NAME"}, []string{"create", "a", "b"}},
		{2, []string{`size "12Q"`}, []string{"create", "dev", "--memory", "12Q"}},
		{2, []string{`size "-1G"`}, []string{"create", "dev", "--memory=-1G"}},
		{2, []string{"--memory 100M", "at least 128M"}, []string{"create", "dev", "--memory", "100M"}},
		{2, []string{"--memory 200000K", "whole number of MiB"}, []string{"create", "dev", "--memory", "200000K"}},
		{2, []string{"--cpus 0"}, []string{"create", "dev", "--cpus", "0"}},
		{2, []string{"-cpus"}, []string{"create", "dev", "--cpus", "two"}},
		{3, []string{"ssh key file", "/nonexistent.pub"}, []string{"create", "dev", "--ssh-key", "/nonexistent.pub"}},
		{2, []string{badKey, "line 1"}, []string{"create", "dev", "--ssh-key", goodKey, "--ssh-key", badKey}},
		{2, []string{privKey, "private key"}, []string{"create", "dev", "--ssh-key", privKey}},
		{2, []string{"--warm-forks -1", "want 0 to 16"}, []string{"daemon", "--warm-forks=-1"}},
		{2, []string{"--warm-forks 17", "want 0 to 16"}, []string{"daemon", "--warm-forks", "17"}},
		{2, []string{"--metrics-listen", "0.0.0.0:9464", "--metrics-allow-remote"}, []string{"daemon", "--metrics-listen", "0.0.0.0:9464"}},
		{2, []string{"--metrics-listen", "want host:port"}, []string{"daemon", "--metrics-listen", "9464"}},
		{2, []string{"--max-forks 0", "want 1 to 4096"}, []string{"create", "dev", "--max-forks", "0"}},
		{2, []string{"--since", "yesterday"}, []string{"events", "--since", "yesterday"}},
		{2, []string{"usage: boxd events"}, []string{"events", "extra"}},
		{2, []string{"usage: boxd fork SRC NEW"}, []string{"fork", "dev"}},
		{2, []string{`box name "Dev"`}, []string{"fork", "Dev", "new"}},
		{2, []string{`box name "new_1"`}, []string{"fork", "dev", "new_1"}},
		{2, []string{"--count 0"}, []string{"fork", "dev", "new", "--count", "0"}},
		{2, []string{"--count 4097"}, []string{"fork", "dev", "new", "--count", "4097"}},
		{2, []string{"-count"}, []string{"fork", "dev", "new", "--count", "many"}},
		{2, []string{`box name "` + strings.Repeat("a", 61) + `-10"`}, []string{"fork", "dev", strings.Repeat("a", 61), "--count", "10"}},
		{2, []string{"usage: boxd hibernate NAME"}, []string{"hibernate"}},
		{2, []string{`box name "a.b"`}, []string{"resume", "a.b"}},
		{2, []string{`box name "UP"`}, []string{"start", "UP"}},
		{2, []string{"usage: boxd stop NAME"}, []string{"stop", "a", "b"}},
		{2, []string{"usage: boxd rm NAME"}, []string{"rm"}},
		{2, []string{`--name: invalid name "a/b"`}, []string{"snapshot", "dev", "--name", "a/b"}},
		{2, []string{"usage: boxd snapshots [NAME]"}, []string{"snapshots", "a", "b"}},
		{2, []string{"usage: boxd exec NAME [-i] [-t] -- CMD"}, []string{"exec", "dev"}},
		{2, []string{"usage: boxd exec NAME [-i] [-t] -- CMD"}, []string{"exec", "dev", "--"}},
		{2, []string{"usage: boxd exec NAME [-i] [-t] -- CMD"}, []string{"exec", "-it", "dev"}},
		{2, []string{`box name "Dev"`}, []string{"exec", "Dev", "--", "true"}},
		{2, []string{"-i passes standard input and --no-stdin withholds it"}, []string{"exec", "dev", "-i", "-n", "--", "cat"}},
		{2, []string{"-i passes standard input and --no-stdin withholds it"}, []string{"exec", "-in", "dev", "cat"}},
		{2, []string{"usage: boxd pause NAME"}, []string{"pause"}},
		{2, []string{`box name "Dev"`}, []string{"unpause", "Dev"}},
		{2, []string{"--from box.dev.s1 and --image together"}, []string{"create", "dev", "--from", "box.dev.s1", "--image", "debian-bookworm"}},
		{2, []string{"--from box.dev.s1 and --memory together"}, []string{"create", "dev", "--from", "box.dev.s1", "--memory", "1G"}},
		{2, []string{"--from box.dev.s1 and --cpus together"}, []string{"create", "dev", "--cpus", "2", "--from", "box.dev.s1"}},
		{2, []string{`--from: invalid name "a/b"`}, []string{"create", "dev", "--from", "a/b"}},
		{2, []string{`--runner: runner "xen": want auto, kvm or qemu`}, []string{"create", "dev", "--runner", "xen"}},
		{9, []string{"--runner: ", "kvm runner", "use --runner qemu"}, []string{"create", "dev", "--runner", "kvm", "--ssh-key", goodKey}},
		{2, []string{"usage: boxd ssh NAME"}, []string{"ssh"}},
		{2, []string{`box name "x_y"`}, []string{"report", "x_y"}},
		{2, []string{"flag provided but not defined"}, []string{"ls", "--colour"}},
		{2, []string{"usage: boxd logs NAME [-f] [--tail N]"}, []string{"logs"}},
		{2, []string{"usage: boxd logs NAME [-f] [--tail N]"}, []string{"logs", "a", "b"}},
		{2, []string{`box name "Dev"`}, []string{"logs", "Dev"}},
		{2, []string{"--tail -1: want a number of lines, 0 or more"}, []string{"logs", "dev", "--tail", "-1"}},
		{2, []string{"--tail -5"}, []string{"logs", "-f", "dev", "-n", "-5"}},
		{2, []string{"-tail"}, []string{"logs", "dev", "--tail", "many"}},
		{2, []string{"boxd logs", "no --json"}, []string{"--json", "logs", "dev"}},
		{2, []string{"flag provided but not defined: -json"}, []string{"logs", "dev", "--json"}},
		// Valid input reaches the daemon, which is not running.
		{8, []string{notRunning}, []string{"ls"}},
		{8, []string{notRunning}, []string{"create", "dev", "--memory", "1G", "--cpus", "2", "--ssh-key", goodKey}},
		{8, []string{notRunning}, []string{"fork", "dev", "new", "--count", "3"}},
		{8, []string{notRunning}, []string{"exec", "dev", "ls", "-l"}},
		{8, []string{notRunning}, []string{"exec", "dev", "--json", "--", "ls", "-l"}},
		{8, []string{notRunning}, []string{"exec", "-it", "dev", "--", "sh"}},
		{8, []string{notRunning}, []string{"exec", "dev", "-t", "-i", "tty"}},
		{8, []string{notRunning}, []string{"exec", "dev", "-it", "--", "tty"}},
		{8, []string{notRunning}, []string{"pause", "dev"}},
		{8, []string{notRunning}, []string{"unpause", "dev", "--json"}},
		{8, []string{notRunning}, []string{"create", "dev", "--from", "box.dev.s1", "--ssh-key", goodKey}},
		{8, []string{notRunning}, []string{"create", "dev", "--runner", "qemu", "--ssh-key", goodKey}},
		{8, []string{notRunning}, []string{"create", "dev", "--runner", "auto", "--ssh-key", goodKey}},
		{8, []string{notRunning}, []string{"snapshot", "dev", "--name", "s1"}},
		{8, []string{notRunning}, []string{"snapshots"}},
		{8, []string{notRunning}, []string{"report"}},
		{8, []string{notRunning}, []string{"rm", "dev", "--json"}},
		{8, []string{notRunning}, []string{"logs", "dev"}},
		{8, []string{notRunning}, []string{"logs", "dev", "-f", "--tail", "0"}},
		{8, []string{notRunning}, []string{"logs", "-fn", "3", "dev"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			fails(t, tc.code, root, tc.want, tc.args...)
		})
	}
	// Refusals happen before anything is written under the root.
	if _, err := os.Stat(filepath.Join(root, "ssh")); !os.IsNotExist(err) {
		t.Errorf("a refused command made ROOT/ssh: %v", err)
	}
}

func TestBoxCommandsHelp(t *testing.T) {
	root := shortRoot(t)
	for _, name := range []string{"daemon", "create", "ls", "fork", "hibernate", "resume", "start", "stop", "pause", "unpause", "snapshot", "snapshots", "exec", "ssh", "rm", "report", "logs"} {
		r := ok(t, root, name, "--help")
		if !strings.Contains(r.stdout, "boxd "+name+" - ") || !strings.Contains(r.stdout, "USAGE:") {
			t.Errorf("boxd %s --help:\n%s", name, r.stdout)
		}
		if r2 := ok(t, root, name, "-h"); r2.stdout != r.stdout {
			t.Errorf("boxd %s -h differs from --help", name)
		}
	}
	r := ok(t, root, "--help")
	for _, name := range []string{"daemon", "create", "fork", "pause", "unpause", "exec", "ssh", "report", "logs"} {
		if !strings.Contains(r.stdout, "   "+name+" ") {
			t.Errorf("boxd --help does not list %s", name)
		}
	}
}

// startDaemon runs `boxd daemon` on root and returns it once it serves.
func startDaemon(t *testing.T, root string) *exec.Cmd {
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
	if !strings.Contains(line, "API on "+filepath.Join(root, "boxd.sock")) {
		t.Fatalf("boxd daemon said %q", line)
	}
	return cmd
}

// TestDaemon runs the real daemon (no box can boot here: no image) and
// checks what needs no box: the socket, empty answers, errors by category,
// a second daemon refused, and a clean exit on SIGTERM.
func TestDaemon(t *testing.T) {
	root := shortRoot(t)
	d := startDaemon(t, root)
	st, err := os.Stat(filepath.Join(root, "boxd.sock"))
	if err != nil || st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket: %v, %v", st, err)
	}
	if st, err := os.Stat(filepath.Join(root, "ssh_host_ed25519_key")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("host key: %v, %v", st, err)
	}
	if r := ok(t, root, "ls"); strings.TrimSpace(r.stdout) != "NAME  STATE  RUNNER  IMAGE  MEMORY  CPUS  FORKED FROM  CREATED" {
		t.Errorf("ls: %q", r.stdout)
	}
	var boxes []map[string]any
	decodeJSON(t, ok(t, root, "ls", "--json").stdout, &boxes)
	if boxes == nil || len(boxes) != 0 {
		t.Errorf("ls --json: %v", boxes)
	}
	var snaps []map[string]any
	decodeJSON(t, ok(t, root, "snapshots", "--json").stdout, &snaps)
	if snaps == nil || len(snaps) != 0 {
		t.Errorf("snapshots --json: %v", snaps)
	}
	var rep map[string]any
	decodeJSON(t, ok(t, root, "report", "--json").stdout, &rep)
	keys(t, "report", rep, "boxes", "total")

	fails(t, 3, root, []string{`"nope"`, "no such box"}, "exec", "nope", "--", "true")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "fork", "nope", "new")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "hibernate", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "snapshots", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "rm", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "ssh", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "logs", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "logs", "-f", "nope")
	fails(t, 3, root, []string{"image", "no-such-image"}, "create", "dev", "--image", "no-such-image", "--ssh-key", filepath.Join(writeKey(t)))
	fails(t, 8, root, []string{"in use"}, "daemon", "--ssh-listen", "127.0.0.1:0")
	// The store's gc goes through the daemon that owns the store; other
	// store commands say it is in use.
	if r := ok(t, root, "store", "gc"); !strings.HasPrefix(r.stdout, "gc: freed ") {
		t.Errorf("store gc with the daemon running: %q", r.stdout)
	}
	var gc map[string]any
	decodeJSON(t, ok(t, root, "store", "gc", "--json").stdout, &gc)
	keys(t, "store gc --json", gc, "bytes_freed", "packs_after")
	fails(t, 8, root, []string{"in use"}, "store", "ls")

	if err := d.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("daemon after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon still running 30s after SIGTERM")
	}
	if _, err := os.Stat(filepath.Join(root, "boxd.sock")); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	fails(t, 8, root, []string{"boxd daemon is not running on " + root}, "ls")
}

func writeKey(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key.pub")
	if err := os.WriteFile(p, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// execManager is a test double of the box manager for the exec and ssh
// commands: one running box, dev, whose commands answer from a script.
// Other calls are not expected (the embedded nil interface panics).
type execManager struct {
	daemon.Manager
}

func (execManager) Get(name string) (box.Box, error) {
	if name != "dev" {
		return box.Box{}, fmt.Errorf("%q: %w", name, box.ErrNotFound)
	}
	return box.Box{Name: "dev", State: box.StateRunning}, nil
}

// Exec answers `exit N` with status N and echoes the rest: arguments on
// stdout, stdin on stderr.
func (execManager) Exec(_ context.Context, name string, cmd agent.Command) (int, error) {
	if name != "dev" {
		return 0, fmt.Errorf("%q: %w", name, box.ErrNotFound)
	}
	if len(cmd.Args) == 2 && cmd.Args[0] == "exit" {
		var code int
		fmt.Sscan(cmd.Args[1], &code)
		return code, nil
	}
	in, _ := io.ReadAll(cmd.Stdin)
	fmt.Fprintln(cmd.Stdout, strings.Join(cmd.Args, "|"))
	cmd.Stderr.Write(in)
	return 0, nil
}

type noGraph struct{}

func (noGraph) List() ([]snapshotter.Snapshot, error) { return nil, nil }
func (noGraph) Report(context.Context, ...string) (snapshotter.Report, error) {
	return snapshotter.Report{}, nil
}
func (noGraph) GC(context.Context, cas.GCOptions) (cas.GCStats, error) { return cas.GCStats{}, nil }

func (noGraph) Compact(context.Context, cas.CompactOptions) (cas.CompactStats, error) {
	return cas.CompactStats{}, nil
}

// serveFake serves the API of an execManager on root's socket.
func serveFake(t *testing.T, root string) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(root, "boxd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := daemon.NewServer(context.Background(), daemon.Options{
		Manager: execManager{}, Graph: noGraph{},
		Info: daemon.Info{Root: root, SSHAddr: "0.0.0.0:2299"},
	})
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
}

func TestExecStatusAndStreams(t *testing.T) {
	root := shortRoot(t)
	serveFake(t, root)
	for _, code := range []int{0, 1, 3, 42, 255} {
		r := run(t, root, "exec", "dev", "--", "exit", fmt.Sprint(code))
		if r.code != code || r.stderr != "" {
			t.Errorf("exit %d: %v", code, r)
		}
	}
	cmd := command(root, "exec", "dev", "--", "echo", "a b", "-n")
	cmd.Stdin = strings.NewReader("input\n")
	out, err := cmd.Output()
	if err != nil || string(out) != "echo|a b|-n\n" {
		t.Errorf("exec: %q, %v", out, err)
	}
	cmd = command(root, "exec", "-n", "dev", "cat")
	cmd.Stdin = strings.NewReader("input\n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil || stderr.String() != "" {
		t.Errorf("exec -n: stdin reached the command: %q, %v", stderr.String(), err)
	}
	cmd = command(root, "exec", "dev", "cat")
	cmd.Stdin = strings.NewReader("input\n")
	stderr.Reset()
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil || stderr.String() != "input\n" {
		t.Errorf("exec: stdin did not reach the command: %q, %v", stderr.String(), err)
	}
	var res map[string]any
	decodeJSON(t, ok(t, root, "exec", "dev", "--json", "--", "echo", "hi").stdout, &res)
	keys(t, "exec --json", res, "exit_code", "stdout", "stderr")
}

func TestSSHRunsOpenSSH(t *testing.T) {
	root := shortRoot(t)
	serveFake(t, root)
	bin := t.TempDir()
	// A stand-in ssh that prints its arguments.
	if err := os.WriteFile(filepath.Join(bin, "ssh"), []byte("#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "ssh"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "ssh", "id_ed25519"), []byte("key"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := command(root, "ssh", "dev", "--", "uname", "-a")
	cmd.Env = append(cmd.Env, "PATH="+bin+":/usr/bin:/bin")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"-p", "2299", "-i", filepath.Join(root, "ssh", "id_ed25519"),
		"-o", "UserKnownHostsFile=" + filepath.Join(root, "ssh", "known_hosts"),
		"-o", "StrictHostKeyChecking=accept-new", "dev@127.0.0.1", "uname", "-a"}
	if got := strings.Fields(string(out)); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("ssh ran with\n%q\nwant\n%q", got, want)
	}
	fails(t, 3, root, []string{"no such box"}, "ssh", "nope")
}
