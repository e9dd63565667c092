// Package boxtest readies boxd roots for tests that boot real boxes under
// QEMU: a small busybox root image in the root's store, Debian's cloud
// kernel from the machine's shared cache, and a static boxd-agent.
package boxtest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/guestkernel"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
)

// Image is the image PrepareRoot makes: busybox on a 64 MiB disk. It boots
// under TCG in seconds, where Debian takes much longer.
const Image = "busybox"

// ImageSize is the image's disk: busybox needs little room.
const ImageSize = 64 << 20

// Skip skips t unless it may boot boxes: not with -short, and only as root
// (QEMU's memory on /dev/shm, loop-free ext4 images, packages installed).
func Skip(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots boxes under QEMU; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("boots boxes under QEMU: needs root")
	}
}

// ShortDir returns a new folder under the system's temporary folder, with a
// path short enough for the unix sockets made under it (t.TempDir's may
// not be), removed when t ends.
func ShortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "boxd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// PrepareRoot readies root so that boxes of Image boot there: the image in
// the root's store (the store is closed again, so a daemon may open it),
// the guest kernel cache pointing at the machine's shared one (fetched
// once per machine), and BOXD_AGENT naming a static agent built for t (set
// with t.Setenv, so child processes such as a daemon inherit it).
func PrepareRoot(t *testing.T, root string) {
	t.Helper()
	Skip(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	testutil.EnsurePackages(ctx, t, map[string]string{
		"qemu-system-x86_64": "qemu-system-x86",
		"qemu-img":           "qemu-utils",
		"mkfs.ext4":          "e2fsprogs",
	})
	busybox := testutil.StaticBusybox(ctx, t)

	agentBin := filepath.Join(t.TempDir(), "boxd-agent")
	build := exec.CommandContext(ctx, "go", "build", "-o", agentBin, "github.com/boxd-dev/boxd/cmd/boxd-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building boxd-agent: %v\n%s", err, out)
	}
	t.Setenv(guest.AgentEnv, agentBin)

	shared, err := guestkernel.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{shared, filepath.Join(root, "cache")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(shared, filepath.Join(root, "cache", "guestkernel")); err != nil && !os.IsExist(err) {
		t.Fatal(err)
	}
	if _, _, err := guest.Kernel(ctx, root, ""); err != nil {
		t.Fatalf("the guest kernel: %v", err)
	}

	g, err := snapshotter.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	}()
	if _, err := guest.ImageFromTree(ctx, g, Image, busyboxTree(t, busybox), guest.TreeOptions{Size: ImageSize}); err != nil {
		t.Fatalf("image %s: %v", Image, err)
	}
}

// Tree returns a new root filesystem tree of busybox, the one Image is made
// of, for tests that build images of their own that boot in seconds.
func Tree(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return busyboxTree(t, testutil.StaticBusybox(ctx, t))
}

// busyboxTree returns a root filesystem of busybox and its applets.
func busyboxTree(t *testing.T, busybox string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tree")
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "run", "var/tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(busybox)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "bin", "busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(dir, "bin", applet)); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/os-release": "PRETTY_NAME=\"busybox (boxd test)\"\nID=busybox\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":      "root:x:0:\ntty:x:5:\n",
		"etc/hostname":   "busybox\n",
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// NewManager returns a box manager of a new root readied by PrepareRoot,
// and its store. Every box is stopped and the manager closed when t ends.
func NewManager(t *testing.T) (*box.Manager, *snapshotter.Graph) {
	t.Helper()
	return NewManagerWith(t, nil)
}

// NewManagerWith is NewManager with the backends' Config adjusted by
// adjust (nil: as it is).
func NewManagerWith(t *testing.T, adjust func(*backends.Config)) (*box.Manager, *snapshotter.Graph) {
	t.Helper()
	return newManager(t, adjust, nil)
}

// NewManagerBox is NewManager with the manager's Config adjusted by adjust.
func NewManagerBox(t *testing.T, adjust func(*box.Config)) (*box.Manager, *snapshotter.Graph) {
	t.Helper()
	return newManager(t, nil, adjust)
}

func newManager(t *testing.T, adjust func(*backends.Config), adjustBox func(*box.Config)) (*box.Manager, *snapshotter.Graph) {
	t.Helper()
	root := ShortDir(t)
	PrepareRoot(t, root)
	g, err := snapshotter.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close() })
	memDir, err := os.MkdirTemp("/dev/shm", "boxd-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(memDir) })
	cfg := backends.Config{Root: root, Graph: g, MemDir: memDir}
	if adjust != nil {
		adjust(&cfg)
	}
	bk := backends.New(cfg)
	bcfg := box.Config{Root: root, Graph: g, Runners: bk.Runners, DefaultRunner: backends.Default}
	if adjustBox != nil {
		adjustBox(&bcfg)
	}
	mgr, err := box.Open(bcfg)
	if err != nil {
		t.Fatal(err)
	}
	bk.Reclaim()
	t.Cleanup(func() {
		ctx := context.Background()
		boxes, _ := mgr.List()
		for _, b := range boxes {
			_, _ = mgr.Stop(ctx, b.Name)
		}
		_ = mgr.Close(ctx)
		_ = bk.Close(ctx)
	})
	return mgr, g
}
