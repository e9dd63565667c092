package integration

// TestShim runs containers in boxes with Debian's containerd 1.6 and boxd's
// shim (runtime io.containerd.boxd.v2): the boxd daemon serves containerd
// its snapshotter (--containerd-snapshotter) and runs each container in a
// box of its own, with the shim as its client.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/shim"
	"github.com/creack/pty"
)

// runtimeName is boxd's runtime in containerd.
const runtimeName = "io.containerd.boxd.v2"

// shimTestSetup skips the test unless it may run containerd, installs
// what it needs and returns its context and folder.
func shimTestSetup(t *testing.T, timeout time.Duration) (context.Context, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test with containerd: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: it runs containerd")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	ensurePackages(t, "containerd", "busybox-static", "e2fsprogs")
	return ctx, t.TempDir()
}

func TestShim(t *testing.T) {
	ctx, tmp := shimTestSetup(t, 20*time.Minute)
	runShimTests(ctx, t, tmp, "")
}

// TestShimContainerd2 runs TestShim's steps under containerd 2.x (built
// from the Go module proxy into the tools cache), which reads the shim's
// start reply as a plain address too and bridges task API v2.
func TestShimContainerd2(t *testing.T) {
	ctx, tmp := shimTestSetup(t, 25*time.Minute)
	runShimTests(ctx, t, tmp, testutil.Containerd2.Build(ctx, t))
}

// runShimTests runs the shim's steps with the containerd and ctr in bin
// ("" for the system's).
func runShimTests(ctx context.Context, t *testing.T, tmp, bin string) {
	dm, snapSock := startShimDaemon(ctx, t, tmp)

	d := &daemons{t: t, dir: filepath.Join(tmp, "ctr"), boxdRoot: dm.root, boxdSock: snapSock,
		ctrSock: filepath.Join(tmp, "ctr", "containerd.sock"), bin: bin}
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	d.startContainerd()
	busybox := busyboxImage(t, filepath.Join(tmp, "images"))
	d.importImage(busybox)
	s := &shimTest{t: t, ctx: ctx, d: d, dm: dm, im: busybox}

	t.Run("kernel", s.kernel)
	t.Run("exit status", s.exitStatus)
	t.Run("stdin", s.stdin)
	t.Run("terminal", s.terminal)
	t.Run("running task", s.runningTask)
	t.Run("checkpoint and restore", s.checkpointRestore)
	t.Run("other snapshotter", s.otherSnapshotter)
	t.Run("shim killed", s.shimKilled)
	t.Run("guest crash", s.guestCrash)
	t.Run("ctr run against runc", s.againstRunc)
}

// startShimDaemon starts a boxd daemon that serves containerd its
// snapshotter on a socket in dir, which it returns, and puts the shim on
// containerd's PATH with the daemon's root in its environment.
func startShimDaemon(ctx context.Context, t *testing.T, dir string) (*daemonEnv, string) {
	t.Helper()
	snapSock := filepath.Join(dir, "snapshotter.sock")
	dm := newDaemonEnv(ctx, t, "--containerd-snapshotter", snapSock)
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dm.root, "daemon.log"))
			t.Logf("last lines of the daemon's log:\n%s", tail(string(b), 40))
		}
	})
	waitFile(t, snapSock, time.Minute)
	shimOnPath(ctx, t, dir)
	t.Setenv("BOXD_ROOT", dm.root)
	return dm, snapSock
}

// shimOnPath builds the shim into a folder of dir and puts it first on
// PATH, for the containerd the test starts next.
func shimOnPath(ctx context.Context, t *testing.T, dir string) {
	t.Helper()
	binDir := filepath.Join(dir, "bin")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(binDir, "containerd-shim-boxd-v2"),
		"github.com/boxd-dev/boxd/cmd/containerd-shim-boxd-v2").CombinedOutput(); err != nil {
		t.Fatalf("building the shim: %v\n%s", err, out)
	}
	t.Setenv("PATH", binDir+":"+os.Getenv("PATH"))
}

// shimTest is TestShim's containerd, daemon and image.
type shimTest struct {
	t   *testing.T
	ctx context.Context
	d   *daemons
	dm  *daemonEnv
	im  image
	n   int
}

// id names a new container.
func (s *shimTest) id() string {
	s.n++
	id := fmt.Sprintf("boxd-test-%d-shim-%d", os.Getpid(), s.n)
	s.d.containers = append(s.d.containers, id)
	return id
}

// ctr runs ctr with stdin and returns its stdout, stderr and exit code.
func (s *shimTest) ctr(t *testing.T, stdin string, args ...string) (string, string, int) {
	t.Helper()
	var in io.Reader
	if stdin != "" {
		in = strings.NewReader(stdin)
	}
	out, errOut, code, err := runIn(s.ctx, 3*time.Minute, in, s.d.tool("ctr"), s.d.ctrArgs(args...)...)
	if code < 0 {
		t.Fatal(err)
	}
	return strings.TrimSpace(strings.ReplaceAll(out, "\r\n", "\n")), errOut, code
}

// runArgs are ctr run's arguments for a container of boxd's runtime.
func (s *shimTest) runArgs(flags ...string) []string {
	return append(append([]string{"run", "--runtime", runtimeName, "--snapshotter", snapshotterName}, flags...), s.im.ref)
}

func (s *shimTest) kernel(t *testing.T) {
	out, errOut, code := s.ctr(t, "", append(s.runArgs("--rm"), s.id(), "uname", "-r")...)
	if code != 0 {
		t.Fatalf("ctr run uname -r: exit %d\n%s", code, errOut)
	}
	host, err := exec.Command("uname", "-r").Output()
	if err != nil {
		t.Fatal(err)
	}
	if out == "" || out == strings.TrimSpace(string(host)) {
		t.Errorf("uname -r in the container: %q; the host's is %q: the container did not run in a box", out, strings.TrimSpace(string(host)))
	}
	t.Logf("the container's kernel: %s", out)
}

func (s *shimTest) exitStatus(t *testing.T) {
	out, errOut, code := s.ctr(t, "", append(s.runArgs("--rm"), s.id(), "sh", "-c", "echo out; echo err >&2; exit 3")...)
	if code != 3 {
		t.Errorf("exit status %d, want 3\n%s", code, errOut)
	}
	if out != "out" || !strings.Contains(errOut, "err") {
		t.Errorf("stdout %q, stderr %q", out, errOut)
	}
}

func (s *shimTest) stdin(t *testing.T) {
	input := strings.Repeat("boxd stdin line\n", 5000)
	out, errOut, code := s.ctr(t, input, append(s.runArgs("--rm"), s.id(), "cat")...)
	if code != 0 {
		t.Fatalf("ctr run cat: exit %d\n%s", code, errOut)
	}
	if out != strings.TrimSpace(input) {
		t.Errorf("cat gave back %d bytes of %d", len(out), len(input))
	}
}

// sizeOnceResized prints the terminal's size once it is no longer the default 24x80 (or after 5 s), then the
// terminal's name: ctr (2.x) starts a process, then resizes its terminal to its own, so a command that asks
// at once may still find the size the terminal was made with.
const sizeOnceResized = `for i in $(seq 50); do s=$(stty size); [ "$s" != "24 80" ] && break; sleep 0.1; done; echo $s; tty`

func (s *shimTest) terminal(t *testing.T) {
	got := s.ctrTTY(t, 33, 101, append(s.runArgs("--rm", "-t"), s.id(), "sh", "-c", sizeOnceResized)...)
	if !strings.Contains(got, "33 101\n") || !strings.Contains(got, "/dev/pts/") {
		t.Errorf("ctr run -t: stty size; tty gave %q, want 33 101 and a /dev/pts terminal", got)
	}
	id := s.start(t)
	got = s.ctrTTY(t, 41, 120, "task", "exec", "-t", "--exec-id", "t1", id, "sh", "-c", sizeOnceResized)
	if !strings.Contains(got, "41 120\n") || !strings.Contains(got, "/dev/pts/") {
		t.Errorf("ctr task exec -t: stty size; tty gave %q, want 41 120 and a /dev/pts terminal", got)
	}
	s.ctr(t, "", "task", "kill", "--signal", "SIGKILL", id)
	s.waitStatus(t, id, "STOPPED")
	s.remove(t, id)
}

// ctrTTY runs ctr on a terminal of rows x cols and returns what it wrote
// there.
func (s *shimTest) ctrTTY(t *testing.T, rows, cols uint16, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(s.ctx, s.d.tool("ctr"), s.d.ctrArgs(args...)...)
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: rows, Cols: cols})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	_, _ = io.Copy(&out, ptmx) // until the terminal's end (EIO)
	_ = ptmx.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("ctr %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return strings.ReplaceAll(out.String(), "\r", "")
}

// start runs a container that sleeps, detached, and returns its id.
func (s *shimTest) start(t *testing.T) string {
	t.Helper()
	id := s.id()
	if _, errOut, code := s.ctr(t, "", append(s.runArgs("-d"), id, "sleep", "100000")...); code != 0 {
		t.Fatalf("ctr run -d: exit %d\n%s", code, errOut)
	}
	return id
}

// status returns the task's status in ctr task ls ("" when not listed).
func (s *shimTest) status(t *testing.T, id string) string {
	t.Helper()
	out, errOut, code := s.ctr(t, "", "task", "ls")
	if code != 0 {
		t.Fatalf("ctr task ls: exit %d\n%s", code, errOut)
	}
	for line := range strings.SplitSeq(out, "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == id {
			return f[2]
		}
	}
	return ""
}

// waitStatus waits until the task's status is want.
func (s *shimTest) waitStatus(t *testing.T, id, want string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		got := s.status(t, id)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("task %s is %q, want %s", id, got, want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// remove deletes a container whose task ended.
func (s *shimTest) remove(t *testing.T, id string) {
	t.Helper()
	if _, errOut, code := s.ctr(t, "", "task", "rm", id); code != 0 {
		t.Errorf("ctr task rm: exit %d\n%s", code, errOut)
	}
	if _, errOut, code := s.ctr(t, "", "container", "rm", id); code != 0 {
		t.Errorf("ctr container rm: exit %d\n%s", code, errOut)
	}
}

// containerBoxes lists the daemon's boxes of container id.
func (s *shimTest) containerBoxes(t *testing.T, id string) []listedBox {
	t.Helper()
	var list []listedBox
	if err := json.Unmarshal([]byte(s.dm.cli(t, "ls", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	var out []listedBox
	for _, b := range list {
		if b.Labels[shim.LabelID] == id && b.Labels[shim.LabelNamespace] == ctrNamespace {
			out = append(out, b)
		}
	}
	return out
}

type listedBox struct {
	Name, State string
	Labels      map[string]string
}

func (s *shimTest) runningTask(t *testing.T) {
	id := s.start(t)
	boxes := s.containerBoxes(t, id)
	if len(boxes) != 1 || boxes[0].State != "running" {
		t.Fatalf("boxd ls: the container's boxes are %+v, want one running", boxes)
	}
	// The container's box is an ordinary box: it snapshots and forks.
	s.dm.cli(t, "snapshot", boxes[0].Name)
	kid := fmt.Sprintf("kid-%d", os.Getpid())
	s.dm.cli(t, "fork", boxes[0].Name, kid)
	s.dm.cli(t, "rm", kid)
	out, errOut, code := s.ctr(t, "", "task", "exec", "--exec-id", "e1", id, "sh", "-c", "echo in-exec; exit 4")
	if code != 4 || out != "in-exec" {
		t.Errorf("ctr task exec: %q, exit %d, want in-exec and 4\n%s", out, code, errOut)
	}
	out, errOut, code = s.ctr(t, "hello exec\n", "task", "exec", "--exec-id", "e2", id, "cat")
	if code != 0 || out != "hello exec" {
		t.Errorf("ctr task exec cat: %q, exit %d\n%s", out, code, errOut)
	}
	out, errOut, code = s.ctr(t, "", "task", "ps", id)
	if code != 0 || len(strings.Split(out, "\n")) < 2 {
		t.Errorf("ctr task ps: exit %d, %q\n%s", code, out, errOut)
	}
	s.ctr(t, "", "task", "pause", id)
	s.waitStatus(t, id, "PAUSED")
	if out, _, code := s.ctr(t, "", "task", "ps", id); code != 0 || len(strings.Split(out, "\n")) < 2 {
		t.Errorf("ctr task ps of the paused task: exit %d, %q", code, out)
	}
	if boxes := s.containerBoxes(t, id); len(boxes) != 1 || boxes[0].State != "paused" {
		t.Errorf("boxd ls: the paused container's boxes are %+v, want one paused", boxes)
	}
	s.ctr(t, "", "task", "resume", id)
	s.waitStatus(t, id, "RUNNING")
	if _, errOut, code := s.ctr(t, "", "task", "kill", "--signal", "SIGTERM", id); code != 0 {
		t.Fatalf("ctr task kill: exit %d\n%s", code, errOut)
	}
	s.waitStatus(t, id, "STOPPED")
	s.remove(t, id)
	if boxes := s.containerBoxes(t, id); len(boxes) != 0 {
		t.Errorf("after ctr task rm the container's boxes are %+v", boxes)
	}
}

func (s *shimTest) checkpointRestore(t *testing.T) {
	id := s.start(t)
	if _, errOut, code := s.ctr(t, "", "task", "exec", "--exec-id", "w", id, "sh", "-c", "echo before-checkpoint > /root/mark"); code != 0 {
		t.Fatalf("writing the mark: exit %d\n%s", code, errOut)
	}
	// ctr task checkpoint makes an image ctr 1.6 cannot restore (its index
	// names no image); ctr containers checkpoint --task makes one it can.
	ref := "docker.io/boxd/checkpoint:" + id
	if _, errOut, code := s.ctr(t, "", "containers", "checkpoint", "--task", "--image", id, ref); code != 0 {
		t.Fatalf("ctr containers checkpoint: exit %d\n%s", code, errOut)
	}
	s.waitStatus(t, id, "RUNNING")
	s.ctr(t, "", "task", "kill", "--signal", "SIGKILL", id)
	s.waitStatus(t, id, "STOPPED")
	s.remove(t, id)

	if _, errOut, code := s.ctr(t, "", "containers", "restore", "--live", id, ref); code != 0 {
		t.Fatalf("ctr containers restore --live: exit %d\n%s", code, errOut)
	}
	s.waitStatus(t, id, "RUNNING")
	out, errOut, code := s.ctr(t, "", "task", "exec", "--exec-id", "r", id, "cat", "/root/mark")
	if code != 0 || out != "before-checkpoint" {
		t.Errorf("after the restore, /root/mark: %q, exit %d\n%s", out, code, errOut)
	}
	s.ctr(t, "", "task", "kill", "--signal", "SIGKILL", id)
	s.waitStatus(t, id, "STOPPED")
	s.remove(t, id)
	s.ctr(t, "", "images", "rm", ref)
}

func (s *shimTest) otherSnapshotter(t *testing.T) {
	id := s.id()
	_, errOut, code := s.ctr(t, "", "run", "--rm", "--runtime", runtimeName, "--snapshotter", "native", s.im.ref, id, "true")
	if code == 0 || !strings.Contains(errOut, "--snapshotter boxd") {
		t.Errorf("a container on the native snapshotter: exit %d, stderr %q; want a refusal naming --snapshotter boxd", code, errOut)
	}
	_, _, _ = s.ctr(t, "", "container", "rm", id)
}

func (s *shimTest) shimKilled(t *testing.T) {
	id := s.start(t)
	pid := shimPID(t, id)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// containerd sees its shim die and runs the shim's delete action,
	// which removes the box.
	deadline := time.Now().Add(2 * time.Minute)
	for len(s.containerBoxes(t, id)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the box of a container whose shim was killed is still there: %+v", s.containerBoxes(t, id))
		}
		time.Sleep(500 * time.Millisecond)
	}
	_, _, _ = s.ctr(t, "", "task", "rm", "--force", id)
	if _, errOut, code := s.ctr(t, "", "container", "rm", id); code != 0 {
		t.Errorf("ctr container rm: exit %d\n%s", code, errOut)
	}
}

// guestCrash kills a container's machine under it: the task exits
// non-zero, and the shim's log (in containerd's) says why.
func (s *shimTest) guestCrash(t *testing.T) {
	id := s.start(t)
	boxes := s.containerBoxes(t, id)
	if len(boxes) != 1 {
		t.Fatalf("the container's boxes: %+v", boxes)
	}
	if err := syscall.Kill(machinePID(t, s.dm.root, boxes[0].Name), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	s.waitStatus(t, id, "STOPPED")
	log, _ := os.ReadFile(filepath.Join(s.d.dir, "containerd.log"))
	if !strings.Contains(string(log), "the container's box stopped under its process") || !strings.Contains(string(log), "process=init status=255") {
		t.Errorf("containerd's log does not say that the box stopped and the task exited 255:\n%s", tail(string(log), 20))
	}
	s.ctr(t, "", "task", "rm", id)
	s.ctr(t, "", "container", "rm", id)
}

// shimPID finds the serving shim of container id.
func shimPID(t *testing.T, id string) int {
	t.Helper()
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(argv[0]) != "containerd-shim-boxd-v2" || !containsArg(argv, id) || containsArg(argv, "start") {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(d)); err == nil {
			return pid
		}
	}
	t.Fatalf("no shim serves container %s", id)
	return 0
}

// TestShimNoDaemon runs containerd on a boxd snapshotter (boxd
// snapshotter) of a root where no daemon runs: the shim's Create says so,
// and nothing is left behind.
func TestShimNoDaemon(t *testing.T) {
	ctx, tmp := shimTestSetup(t, 10*time.Minute)
	t.Cleanup(func() {
		if mounts, loops, err := unmountAll(tmp); len(mounts)+len(loops) > 0 || err != nil {
			t.Logf("cleanup: unmounted %v, detached %v, %v", mounts, loops, err)
		}
	})
	boxd := boxdBinary(t)
	shimOnPath(ctx, t, tmp)
	root := filepath.Join(tmp, "root")
	t.Setenv("BOXD_ROOT", root)
	d := &daemons{t: t, dir: tmp, boxdRoot: root, boxdSock: filepath.Join(tmp, "boxd.sock"), ctrSock: filepath.Join(tmp, "containerd.sock")}
	d.startSnapshotter(boxd)
	d.startContainerd()
	im := busyboxImage(t, filepath.Join(tmp, "images"))
	d.importImage(im)
	id := fmt.Sprintf("boxd-test-%d-nodaemon", os.Getpid())
	d.containers = append(d.containers, id)
	_, errOut, code, _ := runIn(ctx, 3*time.Minute, nil, d.tool("ctr"), d.ctrArgs(
		"run", "--rm", "--runtime", runtimeName, "--snapshotter", snapshotterName, im.ref, id, "true")...)
	want := "boxd daemon is not running: nothing answers on " + filepath.Join(root, "boxd.sock")
	if code == 0 || !strings.Contains(errOut, want) {
		t.Errorf("ctr run with no daemon: exit %d, stderr %q; want %q", code, errOut, want)
	}
	t.Logf("ctr run with no daemon: %s", strings.TrimSpace(errOut))
	if out := d.ctr(time.Minute, "containers", "ls", "-q"); strings.Contains(out, id) {
		t.Errorf("the container is left after its task could not be made: %s", out)
	}
	d.waitNoImages(time.Minute)
	// The shim of a task that was never made goes once containerd shut it
	// down.
	deadline := time.Now().Add(10 * time.Second)
	for len(shimPIDs(d.ctrSock)) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	d.stop()
}

// waitFile waits until path exists.
func waitFile(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		} else if !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %v", path, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
