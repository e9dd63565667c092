package cli_test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// startDaemonLog is startDaemon keeping what the daemon logs.
func startDaemonLog(t *testing.T, root string) (*exec.Cmd, *testutil.LockedBuffer) {
	t.Helper()
	cmd := command(root, "daemon", "--ssh-listen", "127.0.0.1:0", "--idle-hibernate", "0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	log := &testutil.LockedBuffer{}
	cmd.Stderr = log
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
	if err != nil || !strings.Contains(line, "API on "+filepath.Join(root, "boxd.sock")) {
		t.Fatalf("boxd daemon said %q (%v)", line, err)
	}
	return cmd, log
}

// cacheTree puts tree where a build of image name finds its debootstrap
// tree cached (ROOT/cache/rootfs/NAME/tree), so that it fetches nothing.
func cacheTree(t *testing.T, root, name, tree string) {
	t.Helper()
	dir := filepath.Join(root, "cache", "rootfs", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", tree, filepath.Join(dir, "tree")).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
}

// background starts boxd with args; the function it returns waits for it.
func background(t *testing.T, root string, args ...string) func() result {
	t.Helper()
	cmd := command(root, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return func() result {
		_ = cmd.Wait()
		return result{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
	}
}

// TestImagesThroughDaemon builds images while the daemon runs, which owns
// the store: create of the default image builds it first; image build and
// image ls go through the daemon with the output they have without it; a
// box boots from an image built so; a second build of an image being
// built joins it, a rebuild is refused; with the daemon stopped, image
// build works on the store directly. The images are busybox trees, cached
// where a debootstrap tree would be, so nothing is fetched.
func TestImagesThroughDaemon(t *testing.T) {
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	tree := boxtest.Tree(t)
	cacheTree(t, root, guest.DefaultImage, tree)
	d, log := startDaemonLog(t, root)
	t.Cleanup(func() {
		for _, n := range []string{"first", "dev"} {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	key := writeKey(t)

	// A registered key's create (the front door's box commands) builds no
	// image.
	ok(t, root, "keys", "add", key)
	var registered []struct {
		Fingerprint string `json:"fingerprint"`
	}
	decodeJSON(t, ok(t, root, "keys", "ls", "--json").stdout, &registered)
	if len(registered) != 1 {
		t.Fatalf("keys ls: %+v", registered)
	}
	owned := command(root, "create", "mine")
	owned.Env = append(owned.Env, daemon.OwnerEnv+"="+registered[0].Fingerprint)
	out, err := owned.CombinedOutput()
	if owned.ProcessState.ExitCode() != 3 || !strings.Contains(string(out), `no image "`+guest.DefaultImage+`"`) {
		t.Errorf("create for a registered key without the default image: %v: %s", err, out)
	}

	// The default image is built on its first use, with progress on a
	// terminal.
	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	screen := newScreen(ptmx)
	create := command(root, "create", "first", "--memory", "256M", "--ssh-key", key)
	var stdout strings.Builder
	create.Stdout, create.Stderr = &stdout, tty
	if err := create.Run(); err != nil {
		t.Fatalf("create of the default image: %v: %s", err, stdout.String())
	}
	tty.Close()
	if !strings.HasPrefix(stdout.String(), "box first is running (image "+guest.DefaultImage+", 256 MiB") {
		t.Errorf("create of the default image: %q", stdout.String())
	}
	screen.wait(t, "booting box first")
	if got := screen.String(); !strings.Contains(got, "building image "+guest.DefaultImage+" (first use)") || !strings.Contains(got, "making the filesystem...") {
		t.Errorf("create of the default image on a terminal: %q", got)
	}
	if n := strings.Count(log.String(), `msg="building image" image=`+guest.DefaultImage); n != 1 {
		t.Errorf("the daemon logged %d builds of %s, want 1", n, guest.DefaultImage)
	}
	ok(t, root, "rm", "first")
	// A missing image named is not built.
	fails(t, 3, root, []string{`no image "debian-nope"`}, "create", "second", "--image", "debian-nope", "--ssh-key", key)
	if n := strings.Count(log.String(), `msg="building image" image=debian-nope`); n != 0 {
		t.Errorf("the daemon logged a build of debian-nope")
	}

	// image build --tree goes through the daemon: the store is its.
	var img imageInfo
	decodeJSON(t, ok(t, root, "image", "build", "--tree", tree, "--name", "debian-x", "--size", "64M", "--json").stdout, &img)
	if img.Name != "debian-x" || img.Snapshot != "image.debian-x" || img.Size != 64<<20 || img.Source != "tree "+tree {
		t.Errorf("built %+v", img)
	}
	log.WaitFor(t, `msg="building image" image=debian-x`, time.Minute)
	log.WaitFor(t, `msg="image built" image=debian-x`, time.Minute)
	fails(t, 8, root, []string{"in use"}, "store", "ls")
	r := ok(t, root, "image", "build", "--tree", tree, "--name", "debian-x", "--size", "64M")
	if !strings.HasPrefix(r.stdout, "image debian-x is built (snapshot image.debian-x, 64 MiB, built ") || r.stderr != "" {
		t.Errorf("second build: %v", r)
	}
	r = ok(t, root, "image", "ls")
	var rows []string
	for _, line := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		f := strings.Fields(line)
		rows = append(rows, strings.Join(f[:min(len(f), 5)], " "))
	}
	if want := []string{"NAME SNAPSHOT SIZE BUILT", "busybox image.busybox 64 MiB", "debian-bookworm image.debian-bookworm 4 GiB", "debian-x image.debian-x 64 MiB"}; len(rows) != len(want) || rows[0] != want[0] ||
		!strings.HasPrefix(rows[1], want[1]+" ") || !strings.HasPrefix(rows[2], want[2]+" ") || !strings.HasPrefix(rows[3], want[3]+" ") {
		t.Errorf("image ls:\n%s", r.stdout)
	}
	var imgs []imageInfo
	decodeJSON(t, ok(t, root, "image", "ls", "--json").stdout, &imgs)
	if len(imgs) != 3 || imgs[2] != img {
		t.Errorf("image ls --json: %+v, want debian-x last as built: %+v", imgs, img)
	}

	// On a terminal, the daemon's build shows its stages as a build here
	// does.
	if ptmx, tty, err = pty.Open(); err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	screen = newScreen(ptmx)
	onTerm := command(root, "image", "build", "--tree", tree, "--name", "debian-w", "--size", "64M")
	onTerm.Stdout, onTerm.Stderr = tty, tty
	if err := onTerm.Run(); err != nil {
		t.Fatalf("image build on a terminal: %v", err)
	}
	tty.Close()
	screen.wait(t, "image debian-w built in ")
	if got := screen.String(); !strings.Contains(got, "configuring...") || !strings.Contains(got, "making the filesystem...") {
		t.Errorf("image build through the daemon on a terminal showed no stages: %q", got)
	}

	// A box boots from it while the daemon runs.
	r = ok(t, root, "create", "dev", "--image", "debian-x", "--memory", "256M", "--ssh-key", key)
	if !strings.HasPrefix(r.stdout, "box dev is running (image debian-x, ") {
		t.Errorf("create from debian-x: %q", r.stdout)
	}
	if r := ok(t, root, "exec", "dev", "--", "hostname"); r.stdout != "dev\n" {
		t.Errorf("hostname of dev: %q", r.stdout)
	}
	ok(t, root, "rm", "dev")

	// Concurrent builds of one image: holding its cache's lock keeps the
	// first waiting while the others come.
	cacheTree(t, root, "debian-y", tree)
	lock, err := os.OpenFile(filepath.Join(root, "cache", "rootfs", "debian-y.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	first := background(t, root, "image", "build", "--name", "debian-y", "--size", "64M", "--json")
	log.WaitFor(t, `msg="building image" image=debian-y`, time.Minute)
	fails(t, 5, root, []string{"image debian-y is being built", "run it again once that build ends"}, "image", "build", "--name", "debian-y", "--rebuild")
	second := background(t, root, "image", "build", "--name", "debian-y", "--json")
	log.WaitFor(t, `msg="joining the build of image in progress" image=debian-y`, time.Minute)
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	var y1, y2 imageInfo
	r1, r2 := first(), second()
	if r1.code != 0 || r2.code != 0 {
		t.Fatalf("concurrent builds:\n%v\n%v", r1, r2)
	}
	decodeJSON(t, r1.stdout, &y1)
	decodeJSON(t, r2.stdout, &y2)
	if y1.Name != "debian-y" || y1.Size != 64<<20 || y2 != y1 {
		t.Errorf("concurrent builds made %+v and %+v, want one image of 64 MiB", y1, y2)
	}
	if n := strings.Count(log.String(), `msg="building image" image=debian-y`); n != 1 {
		t.Errorf("the daemon logged %d builds of debian-y, want 1", n)
	}

	// Without the daemon, image build and ls open the store themselves.
	if err := d.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := d.Wait(); err != nil {
		t.Fatalf("daemon after SIGTERM: %v", err)
	}
	r = ok(t, root, "image", "build", "--tree", tree, "--name", "debian-z", "--size", "64M")
	if !strings.HasPrefix(r.stdout, "image debian-z built in ") || !strings.Contains(r.stdout, "64 MiB disk") {
		t.Errorf("build without the daemon: %v", r)
	}
	decodeJSON(t, ok(t, root, "image", "ls", "--json").stdout, &imgs)
	if len(imgs) != 6 || imgs[5].Name != "debian-z" {
		t.Errorf("image ls --json without the daemon: %+v", imgs)
	}
}
