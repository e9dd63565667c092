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
	args             []string // more flags of boxd daemon
	cmd              *exec.Cmd
	env              []string
	key, wrongKey    string
}

func (d *daemonEnv) start(t *testing.T) {
	t.Helper()
	args := append([]string{"--root", d.root, "daemon", "--ssh-listen", "127.0.0.1:" + d.port, "--idle-hibernate", "0"}, d.args...)
	cmd := exec.Command(d.boxd, args...)
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

// logTail logs the last lines the daemons on the root wrote.
func (d *daemonEnv) logTail(t *testing.T) {
	t.Helper()
	b, _ := os.ReadFile(filepath.Join(d.root, "daemon.log"))
	t.Logf("the daemon's log, its end:\n%s", tail(string(b), 80))
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
// root, makes two keys and starts the daemon (with more flags args), which
// the test's end stops.
func newDaemonEnv(ctx context.Context, t *testing.T, args ...string) *daemonEnv {
	t.Helper()
	e := newBoxEnv(ctx, t) // builds the agent and the image; its manager is closed below
	ensurePackages(t, "openssh-client")
	if err := e.mgr.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.g.Close(); err != nil { // the daemon owns the store from here
		t.Fatal(err)
	}
	d := &daemonEnv{root: e.root, port: freePort(t), env: os.Environ(), args: args}
	d.boxd = filepath.Join(e.root, "boxd")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", d.boxd, "github.com/boxd-dev/boxd/cmd/boxd").CombinedOutput(); err != nil {
		t.Fatalf("building boxd: %v\n%s", err, out)
	}
	d.key, d.wrongKey = filepath.Join(e.root, "key"), filepath.Join(e.root, "wrong")
	sshKeygen(t, d.key)
	sshKeygen(t, d.wrongKey)
	d.start(t)
	t.Cleanup(func() {
		d.stop(t)
		if t.Failed() {
			d.logTail(t)
		}
		// Boxes outlive the daemon: a test that failed while none ran
		// leaves no QEMU behind.
		if owners, _ := filepath.Glob("/dev/shm/boxd-*/owner"); len(owners) > 0 {
			for _, o := range owners {
				if b, _ := os.ReadFile(o); strings.HasSuffix(strings.TrimSpace(string(b)), " "+d.root) {
					for _, pid := range qemusOf(filepath.Dir(o)) {
						_ = syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
		}
	})
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
	// kill -9 of the daemon: its boxes run on, and the next daemon on the
	// root adopts them, their processes and files intact.
	d.killAndRestart(t)

	// A box whose QEMU was killed while no daemon ran is marked stopped,
	// saying why, and boots on its next use.
	if out, _, _ := d.ssh(t, d.key, "dev", "hostname"); out != "dev" { // the SIGTERM above hibernated it
		t.Fatalf("dev woken: %q", out)
	}
	killed := d.kill(t)
	pid := machinePID(t, d.root, "dev")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid)
	d.start(t)
	d.noMachinesOf(t, killed)
	for _, b := range d.boxes(t) {
		switch {
		case b.Name == "dev" && b.State == "hibernated" && strings.Contains(b.Note, "memory was not restored"):
			// The daemon was killed while dev's memory still came back
			// from its snapshot (a lazy resume): dev is hibernated in it
			// again, and the next use resumes it.
			t.Logf("dev, killed while its memory came back: %s (%q)", b.State, b.Note)
		case b.Name == "dev" && (b.State != "stopped" || !strings.Contains(b.Note, "its machine ended meanwhile")):
			t.Fatalf("dev, whose QEMU was killed while no daemon ran: %s (%q), want stopped with the reason", b.State, b.Note)
		case b.Name == "f1" && b.State != "running":
			t.Fatalf("f1 after the second restart: %s (%q), want running", b.State, b.Note)
		}
	}
	if out, _, _ := d.ssh(t, d.key, "dev", "hostname"); out != "dev" {
		t.Fatalf("dev after a cold boot: %q", out)
	}

	// An adopted box forks (its spares are new) and hibernates.
	d.cli(t, "fork", "f1", "f2")
	if out, _, _ := d.ssh(t, d.key, "f2", "cat /root/fork.txt"); out != "fork" {
		t.Fatalf("f2, a fork of an adopted box: %q", out)
	}
	d.cli(t, "rm", "f2")
	d.cli(t, "hibernate", "f1")
	woken, _, _ := d.ssh(t, d.key, "f1", "wc -l < /root/count")
	time.Sleep(time.Second)
	if later, _, _ := d.ssh(t, d.key, "f1", "wc -l < /root/count"); mustAtoi(t, later) <= mustAtoi(t, woken) {
		t.Fatalf("f1's counter after it was adopted, hibernated and woken: %s then %s", woken, later)
	}

	// SIGTERM with --leave-running leaves the boxes running for the next
	// daemon, which adopts them.
	d.stop(t) // without --leave-running: the boxes hibernate
	d.args = []string{"--leave-running"}
	d.start(t)
	for _, n := range []string{"f1", "dev"} {
		if out, _, _ := d.ssh(t, d.key, n, "hostname"); out != n {
			t.Fatalf("%s woken: %q", n, out)
		}
	}
	d.ssh(t, d.key, "dev", "echo kept > /root/kept.txt")
	d.stop(t) // SIGTERM: f1 and dev run on
	d.args = nil
	d.checkRunsAlone(t, "f1")
	d.start(t)
	d.checkAdopted(t, "f1", time.Now())
	// dev woke lazily just before that stop: the daemon left it running
	// with all its memory in place, so it was adopted, with what it wrote.
	for _, b := range d.boxes(t) {
		if b.Name == "dev" && (b.State != "running" || b.Note != "") {
			t.Fatalf("dev, resumed just before a stop with --leave-running: %s (%q), want running (adopted)", b.State, b.Note)
		}
	}

	// dev, adopted on a memory file of its own (it booted), forks and
	// hibernates too.
	d.cli(t, "fork", "dev", "f3")
	if out, errOut, code := d.ssh(t, d.key, "f3", "cat /root/kept.txt"); out != "kept" {
		t.Fatalf("f3, a fork of an adopted box: %q, exit %d, %s", out, code, errOut)
	}
	d.cli(t, "rm", "f3")
	d.cli(t, "hibernate", "dev")
	if out, _, _ := d.ssh(t, d.key, "dev", "cat /root/kept.txt"); out != "kept" {
		t.Fatalf("dev, adopted, hibernated and woken: %q", out)
	}

	// rm leaves no QEMU, memory file, socket or machine folder.
	d.cli(t, "rm", "f1")
	d.cli(t, "rm", "dev")
	mem := memFolder(t, d.root)
	if files := memFiles(t, mem); len(files) != 0 {
		t.Fatalf("memory files left after rm of every box: %v", files)
	}
	if dirs, _ := filepath.Glob(filepath.Join(d.root, "run", "qemu-*")); len(dirs) != 0 {
		t.Fatalf("machine folders left after rm of every box: %v", dirs)
	}
	if pids := qemusOf(mem); len(pids) != 0 {
		t.Fatalf("QEMUs of the root left after rm of every box: %v", pids)
	}
}

// killAndRestart kills the daemon with -9 while box f1 counts in a loop,
// checks that f1's QEMU runs on without it, starts a new daemon and checks
// that it adopted f1: listed running, exec works, the counter has no gap
// and grows.
func (d *daemonEnv) killAndRestart(t *testing.T) {
	t.Helper()
	d.ssh(t, d.key, "f1", `nohup sh -c 'while :; do date +%s%N >> /root/count; sleep 0.2; done' >/dev/null 2>&1 &`)
	time.Sleep(time.Second)
	states := map[string]string{}
	for _, b := range d.boxes(t) {
		states[b.Name] = b.State
	}
	if states["f1"] != "running" {
		t.Fatalf("f1 before the daemon is killed: %s, want running", states["f1"])
	}
	killed := d.kill(t)
	d.checkRunsAlone(t, "f1")
	restarted := time.Now()
	d.start(t)
	d.noMachinesOf(t, killed)
	for _, b := range d.boxes(t) {
		if b.State != states[b.Name] {
			t.Fatalf("box %s after the daemon was killed: %s (%q), want %s", b.Name, b.State, b.Note, states[b.Name])
		}
	}
	d.checkAdopted(t, "f1", restarted)
}

// kill ends the daemon with SIGKILL and returns its pid.
func (d *daemonEnv) kill(t *testing.T) int {
	t.Helper()
	pid := d.cmd.Process.Pid
	_ = d.cmd.Process.Kill()
	_ = d.cmd.Wait()
	d.cmd = nil
	return pid
}

// checkRunsAlone checks that box name's QEMU runs, and uses CPU, while no
// daemon does.
func (d *daemonEnv) checkRunsAlone(t *testing.T, name string) {
	t.Helper()
	pid := machinePID(t, d.root, name)
	cpu := func() int {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatalf("%s's QEMU (pid %d) is gone without the daemon: %v", name, pid, err)
		}
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		return mustAtoi(t, f[11]) + mustAtoi(t, f[12])
	}
	before := cpu()
	time.Sleep(2 * time.Second)
	if after := cpu(); after <= before {
		t.Fatalf("%s's QEMU (pid %d) used no CPU in 2s without the daemon", name, pid)
	}
}

// checkAdopted checks that the daemon adopted box name, which counts into
// /root/count: it is running, its counter shows no gap of more than the
// loop's pace would explain and went on past restarted, and it grows.
func (d *daemonEnv) checkAdopted(t *testing.T, name string, restarted time.Time) {
	t.Helper()
	for _, b := range d.boxes(t) {
		if b.Name == name && (b.State != "running" || b.Note != "") {
			t.Fatalf("%s after a restart: %s (%q), want running", name, b.State, b.Note)
		}
	}
	if out := d.cli(t, "exec", name, "--", "hostname"); strings.TrimSpace(out) != name {
		t.Fatalf("boxd exec %s hostname: %q", name, out)
	}
	out, _, code := d.ssh(t, d.key, name, "date +%s%N; cat /root/count")
	lines := strings.Fields(out)
	if code != 0 || len(lines) < 10 {
		t.Fatalf("%s's counter after a restart: %q (exit %d)", name, out, code)
	}
	// On the guest's clock, not the host's: the counter ran from before
	// the restart began up to now with no gap.
	now, stamps := time.Duration(mustAtoi(t, lines[0])), lines[1:]
	from := now - time.Since(restarted) - 2*time.Second
	prev, first := time.Duration(0), time.Duration(0)
	for _, s := range stamps {
		st := time.Duration(mustAtoi(t, s))
		if st < from {
			prev = st
			continue
		}
		if first == 0 {
			first = prev
		}
		if gap := st - prev; prev != 0 && gap > 3*time.Second {
			t.Fatalf("%s's counter has a gap of %s, %s before now", name, gap, now-st)
		}
		prev = st
	}
	if first == 0 {
		t.Fatalf("%s's counter did not run before the restart began (%s ago)", name, time.Since(restarted))
	}
	if ran := now - prev; ran > 3*time.Second {
		t.Fatalf("%s's counter stopped %s before now", name, ran)
	}
	time.Sleep(time.Second)
	if after, _, _ := d.ssh(t, d.key, name, "wc -l < /root/count"); mustAtoi(t, after) <= len(stamps) {
		t.Fatalf("%s's counter does not grow after the restart: %d then %s lines", name, len(stamps), after)
	}
}

// noMachinesOf checks that nothing of the killed daemon's is left but the
// machines the new one adopted: every machine folder under ROOT/run is a
// live QEMU's, and every QEMU on the root's memory folder has one.
func (d *daemonEnv) noMachinesOf(t *testing.T, killed int) {
	t.Helper()
	live := map[int]bool{}
	// Machines the running daemon starts meanwhile (spares) may not have
	// written their state yet; only the killed daemon's must be gone.
	starting := fmt.Sprintf("qemu-%d-", d.cmd.Process.Pid)
	dirs, _ := filepath.Glob(filepath.Join(d.root, "run", "qemu-*"))
	for _, dir := range dirs {
		if strings.HasPrefix(filepath.Base(dir), starting) {
			if _, err := os.Stat(filepath.Join(dir, "state.json")); err != nil {
				continue
			}
		}
		pid := statePID(t, dir)
		if syscall.Kill(pid, 0) != nil {
			t.Fatalf("machine folder %s of a QEMU (pid %d) that is gone", dir, pid)
		}
		live[pid] = true
	}
	for _, pid := range qemusOf(memFolder(t, d.root)) {
		if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !live[pid] && bytes.Contains(cmdline, []byte("/"+starting)) {
			continue // the running daemon's, starting
		}
		if !live[pid] {
			t.Fatalf("QEMU pid %d on the root's memory folder has no machine folder: the killed daemon's (pid %d) spare?", pid, killed)
		}
	}
}

// machinePID is the pid of box name's QEMU, from the box's machine file
// and the machine's state file.
func machinePID(t *testing.T, root, name string) int {
	t.Helper()
	id, err := os.ReadFile(filepath.Join(root, "boxes", name, "machine"))
	if err != nil {
		t.Fatalf("box %s names no machine: %v", name, err)
	}
	dirs, _ := filepath.Glob(filepath.Join(root, "run", strings.TrimSpace(string(id))+"-*"))
	if len(dirs) != 1 {
		t.Fatalf("box %s's machine %s has folders %v", name, id, dirs)
	}
	return statePID(t, dirs[0])
}

func statePID(t *testing.T, dir string) int {
	t.Helper()
	var st struct{ PID int }
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	if err != nil || st.PID <= 0 {
		t.Fatalf("machine folder %s: no state: %v", dir, err)
	}
	return st.PID
}

// waitGone waits until process pid is no more (its parent reaped it).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; syscall.Kill(pid, 0) == nil; i++ {
		if i > 500 {
			t.Fatalf("process %d still there", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// qemusOf lists the processes whose command line names the memory folder
// mem: the root's QEMUs.
func qemusOf(mem string) []int {
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(b, []byte("mem-path="+mem+"/")) {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil {
			out = append(out, pid)
		}
	}
	return out
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
