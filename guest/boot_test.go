package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/guestkernel"
	"github.com/boxd-dev/boxd/internal/initramfs"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// virtioDeps mirrors the depends= of the Debian cloud kernel's virtio
// modules.
var virtioDeps = map[string]string{
	"virtio_ring":           "",
	"virtio":                "",
	"virtio_pci_legacy_dev": "",
	"virtio_pci_modern_dev": "",
	"virtio_pci":            "virtio_pci_modern_dev,virtio_ring,virtio,virtio_pci_legacy_dev",
	"virtio_console":        "virtio_ring,virtio",
	"failover":              "",
	"net_failover":          "failover",
	"virtio_net":            "net_failover,virtio_ring,virtio",
	"virtio_blk":            "virtio_ring,virtio",
	"floppy":                "", // not wanted
}

func TestModuleOrder(t *testing.T) {
	withExt4 := map[string]string{"ext4": "jbd2,mbcache,crc16", "jbd2": "", "mbcache": "", "crc16": ""}
	tests := []struct {
		name  string
		extra map[string]string
		want  string
	}{
		{"ext4 built in", nil,
			"virtio_pci_modern_dev virtio_ring virtio virtio_pci_legacy_dev virtio_pci virtio_console failover net_failover virtio_net virtio_blk"},
		{"ext4 a module", withExt4,
			"virtio_pci_modern_dev virtio_ring virtio virtio_pci_legacy_dev virtio_pci virtio_console failover net_failover virtio_net virtio_blk jbd2 mbcache crc16 ext4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			fakeModules(t, dir, virtioDeps)
			fakeModules(t, dir, tt.extra)
			order, err := boxModuleOrder(dir)
			must(t, err)
			var names []string
			for _, m := range order {
				names = append(names, m.Name)
			}
			if got := strings.Join(names, " "); got != tt.want {
				t.Fatalf("order\n got %s\nwant %s", got, tt.want)
			}
			if got, want := string(orderFile(order)), strings.ReplaceAll(tt.want, " ", ".ko\n")+".ko\n"; got != want {
				t.Fatalf("order file\n got %q\nwant %q", got, want)
			}
		})
	}
}

func TestModuleOrderMissing(t *testing.T) {
	dir := t.TempDir()
	deps := map[string]string{}
	for k, v := range virtioDeps {
		if k != "failover" {
			deps[k] = v
		}
	}
	fakeModules(t, dir, deps)
	_, err := boxModuleOrder(dir)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "failover") {
		t.Fatalf("want a not-found error naming failover, got %v", err)
	}
}

// fakeAgent writes an ELF file without a program interpreter: static, as
// far as Initramfs can tell.
func fakeAgent(t *testing.T, dir, marker string) string {
	p := filepath.Join(dir, "boxd-agent")
	testutil.WriteELF(t, p, "agent="+marker)
	must(t, os.Chmod(p, 0o755))
	return p
}

func TestInitramfsContents(t *testing.T) {
	for _, withModules := range []bool{true, false} {
		t.Run(map[bool]string{true: "modules", false: "built-in drivers"}[withModules], func(t *testing.T) {
			root, tmp := t.TempDir(), t.TempDir()
			modDir := ""
			if withModules {
				modDir = filepath.Join(tmp, "modules")
				fakeModules(t, modDir, virtioDeps)
			}
			agent := fakeAgent(t, tmp, "one")
			path, err := Initramfs(context.Background(), root, modDir, agent)
			must(t, err)
			if dir := filepath.Join(root, "cache", "initramfs"); filepath.Dir(path) != dir || !strings.HasSuffix(path, ".cpio.gz") {
				t.Fatalf("initramfs at %s, want DIR/KEY.cpio.gz in %s", path, dir)
			}
			entries := readInitramfs(t, path)
			byName := map[string]cpioEntry{}
			for _, e := range entries {
				byName[e.name] = e
				if e.uid != 0 || e.gid != 0 {
					t.Errorf("%s owned by %d:%d, want 0:0", e.name, e.uid, e.gid)
				}
			}
			agentBytes, _ := os.ReadFile(agent)
			if e := byName["init"]; e.mode != 0o100755 || !bytes.Equal(e.data, agentBytes) {
				t.Errorf("/init: mode %o, %d bytes; want the agent's %d bytes, mode 100755", e.mode, len(e.data), len(agentBytes))
			}
			if e := byName["dev/console"]; e.mode != 0o020600 || e.rmajor != 5 || e.rminor != 1 {
				t.Errorf("/dev/console: mode %o, device %d,%d; want char device 5,1", e.mode, e.rmajor, e.rminor)
			}
			for _, d := range []string{"dev", "proc", "sys", "run", "newroot", "tmp", ModuleDir} {
				if e, ok := byName[d]; !ok || e.mode&0o170000 != 0o040000 {
					t.Errorf("/%s: missing or not a folder (mode %o)", d, e.mode)
				}
			}
			if e := byName["tmp"]; e.mode&0o1777 != 0o1777 {
				t.Errorf("/tmp mode %o, want sticky and world-writable", e.mode)
			}
			order := string(byName[ModuleDir+"/order"].data)
			var kos []string
			for _, e := range entries {
				if strings.HasPrefix(e.name, ModuleDir+"/") && strings.HasSuffix(e.name, ".ko") {
					kos = append(kos, strings.TrimPrefix(e.name, ModuleDir+"/"))
					src := filepath.Join(modDir, "kernel", strings.ReplaceAll(strings.TrimSuffix(filepath.Base(e.name), ".ko"), "_", "-")+".ko")
					if want, _ := os.ReadFile(src); !bytes.Equal(e.data, want) {
						t.Errorf("%s differs from %s", e.name, src)
					}
				}
			}
			if withModules {
				if len(kos) != 10 || slices.Contains(kos, "floppy.ko") {
					t.Errorf("modules in the initramfs: %v; want the 10 a box needs", kos)
				}
				if strings.Join(kos, "\n")+"\n" != order {
					t.Errorf("order file %q does not list the modules %v in the order they were written", order, kos)
				}
			} else if len(kos) != 0 || order != "" {
				t.Errorf("a kernel with its drivers built in got modules %v, order %q", kos, order)
			}
		})
	}
}

func TestInitramfsCache(t *testing.T) {
	ctx := context.Background()
	root, tmp := t.TempDir(), t.TempDir()
	modDir := filepath.Join(tmp, "modules")
	fakeModules(t, modDir, virtioDeps)
	agent := fakeAgent(t, tmp, "one")
	first, err := Initramfs(ctx, root, modDir, agent)
	must(t, err)
	fi1, err := os.Stat(first)
	must(t, err)
	again, err := Initramfs(ctx, root, modDir, agent)
	must(t, err)
	fi2, err := os.Stat(again)
	must(t, err)
	if again != first || !os.SameFile(fi1, fi2) || !fi1.ModTime().Equal(fi2.ModTime()) {
		t.Fatalf("second call made %s again (first %s)", again, first)
	}
	// A changed agent, or a changed module, is a new image.
	agent2 := fakeAgent(t, t.TempDir(), "two")
	other, err := Initramfs(ctx, root, modDir, agent2)
	must(t, err)
	testutil.WriteELF(t, filepath.Join(modDir, "kernel", "virtio-blk.ko"), "depends=virtio_ring,virtio", "name=virtio_blk", "version=2")
	third, err := Initramfs(ctx, root, modDir, agent)
	must(t, err)
	if other == first || third == first || third == other {
		t.Fatalf("changed inputs reused an image: %s %s %s", first, other, third)
	}
	leftovers, _ := filepath.Glob(filepath.Join(root, "cache", "initramfs", ".*"))
	if len(leftovers) > 0 {
		t.Fatalf("temporary files left: %v", leftovers)
	}
}

func TestInitramfsRefusesDynamicAgent(t *testing.T) {
	sh, err := exec.LookPath("sh")
	must(t, err)
	_, err = Initramfs(context.Background(), t.TempDir(), "", sh)
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "dynamically") {
		t.Fatalf("want a refusal of a dynamically linked agent, got %v", err)
	}
	_, err = Initramfs(context.Background(), t.TempDir(), "", filepath.Join(t.TempDir(), "none"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("want not-exist for a missing agent, got %v", err)
	}
}

func TestFindAgent(t *testing.T) {
	dir := t.TempDir()
	exeDir := filepath.Join(dir, "bin")
	pathDir := filepath.Join(dir, "path")
	for _, d := range []string{exeDir, pathDir} {
		must(t, os.MkdirAll(d, 0o755))
		must(t, os.WriteFile(filepath.Join(d, "boxd-agent"), []byte("agent"), 0o755))
	}
	envAgent := filepath.Join(dir, "env-agent")
	must(t, os.WriteFile(envAgent, []byte("agent"), 0o755))
	inPath := func(string) (string, error) { return filepath.Join(pathDir, "boxd-agent"), nil }
	notInPath := func(string) (string, error) { return "", exec.ErrNotFound }
	tests := []struct {
		name     string
		env      string
		exe      string
		lookPath func(string) (string, error)
		want     string
		wantErr  string
	}{
		{"env wins", envAgent, filepath.Join(exeDir, "boxd"), inPath, envAgent, ""},
		{"env names nothing", filepath.Join(dir, "nope"), filepath.Join(exeDir, "boxd"), inPath, "", "BOXD_AGENT=" + filepath.Join(dir, "nope")},
		{"beside the executable", "", filepath.Join(exeDir, "boxd"), inPath, filepath.Join(exeDir, "boxd-agent"), ""},
		{"in PATH", "", filepath.Join(dir, "elsewhere", "boxd"), inPath, filepath.Join(pathDir, "boxd-agent"), ""},
		{"nowhere", "", filepath.Join(dir, "elsewhere", "boxd"), notInPath, "", "run make build"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			getenv := func(k string) string {
				if k == AgentEnv {
					return tt.env
				}
				return ""
			}
			got, err := findAgent(getenv, tt.exe, tt.lookPath)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, errdefs.ErrNotFound) {
					t.Fatalf("want a not-found error with %q, got %q, %v", tt.wantErr, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestCmdline(t *testing.T) {
	tests := []struct{ host, want string }{
		{"box1", "console=ttyS0 panic=-1 quiet boxd.root=/dev/vda boxd.hostname=box1"},
		{"", "console=ttyS0 panic=-1 quiet boxd.root=/dev/vda"},
	}
	for _, tt := range tests {
		got := Cmdline(tt.host)
		if got != tt.want {
			t.Errorf("Cmdline(%q) = %q, want %q", tt.host, got, tt.want)
		}
		if strings.Contains(got, " root=") {
			t.Errorf("Cmdline(%q) passes root= to the kernel; the agent mounts the root", tt.host)
		}
	}
}

func TestKernelFlag(t *testing.T) {
	dir := t.TempDir()
	k := filepath.Join(dir, "vmlinuz")
	must(t, os.WriteFile(k, []byte("kernel"), 0o644))
	path, mods, err := Kernel(context.Background(), t.TempDir(), k)
	if err != nil || path != k || mods != "" {
		t.Fatalf("Kernel with --kernel %s: %q %q %v", k, path, mods, err)
	}
	if _, _, err := Kernel(context.Background(), t.TempDir(), filepath.Join(dir, "none")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing --kernel: want not-exist, got %v", err)
	}
	if _, _, err := Kernel(context.Background(), t.TempDir(), dir); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("--kernel a folder: want invalid argument, got %v", err)
	}
}

// cloudKernel returns Debian's cloud kernel through Kernel, with the root's
// kernel cache pointing at the cache the other boot tests share, so that it
// is downloaded once per machine.
func cloudKernel(t *testing.T, ctx context.Context, root string) (vmlinuz, modules string) {
	t.Helper()
	shared, err := guestkernel.DefaultCacheDir()
	must(t, err)
	must(t, os.MkdirAll(shared, 0o755))
	must(t, os.MkdirAll(filepath.Join(root, "cache"), 0o755))
	must(t, os.Symlink(shared, filepath.Join(root, "cache", "guestkernel")))
	start := time.Now()
	vmlinuz, modules, err = Kernel(ctx, root, "")
	if err != nil {
		t.Fatalf("cannot fetch the guest kernel: %v", err)
	}
	t.Logf("kernel %s (%v)", vmlinuz, time.Since(start).Round(time.Millisecond))
	return vmlinuz, modules
}

// TestCloudKernelModules checks the load order Initramfs writes for the
// real kernel against the one verified on these machines.
func TestCloudKernelModules(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	root := t.TempDir()
	_, modules := cloudKernel(t, ctx, root)
	start := time.Now()
	path, err := Initramfs(ctx, root, modules, fakeAgent(t, t.TempDir(), "x"))
	must(t, err)
	t.Logf("initramfs built in %v", time.Since(start).Round(time.Millisecond))
	var order string
	for _, e := range readInitramfs(t, path) {
		if e.name == ModuleDir+"/order" {
			order = string(e.data)
		}
	}
	got := strings.Fields(strings.ReplaceAll(order, ".ko", ""))
	// ext4 is built into this kernel; if it ever is a module it comes last.
	got = slices.DeleteFunc(got, func(s string) bool {
		return slices.Contains([]string{"ext4", "jbd2", "mbcache", "crc16", "crc32c_generic", "crc32c_intel"}, s)
	})
	want := []string{"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
		"virtio_console", "failover", "net_failover", "virtio_net", "virtio_blk"}
	if !sameSet(got, want) {
		t.Fatalf("modules %v, want %v", got, want)
	}
	// Each module after the ones it depends on.
	mods, err := initramfs.ScanModules(modules)
	must(t, err)
	loaded := map[string]bool{}
	for _, name := range strings.Fields(strings.ReplaceAll(order, ".ko", "")) {
		for _, dep := range mods[name].Depends {
			if !loaded[dep] {
				t.Fatalf("order %q loads %s before %s, which it depends on", order, name, dep)
			}
		}
		loaded[name] = true
	}
	t.Logf("load order: %s", strings.ReplaceAll(strings.TrimSpace(order), "\n", " "))
	start = time.Now()
	again, err := Initramfs(ctx, root, modules, fakeAgent(t, t.TempDir(), "x"))
	must(t, err)
	if again != path {
		t.Fatalf("same inputs gave %s, then %s", path, again)
	}
	t.Logf("cached initramfs found in %v", time.Since(start).Round(time.Millisecond))
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestBootFakeAgent boots the cloud kernel under QEMU with an initramfs
// whose /init is a stand-in for boxd-agent (testdata/fakeinit) and a
// root disk from ImageFromTree: the modules load in the order the initramfs
// lists, the disk and the network appear, and the root mounts.
func TestBootFakeAgent(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Linux guest under QEMU; skipped with -short")
	}
	needTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	testutil.EnsurePackages(ctx, t, map[string]string{"qemu-system-x86_64": "qemu-system-x86"})
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	vmlinuz, modules := cloudKernel(t, ctx, g.Root())

	agent := filepath.Join(t.TempDir(), "fakeinit")
	build := exec.CommandContext(ctx, "go", "build", "-o", agent, "./testdata/fakeinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the stand-in agent: %v\n%s", err, out)
	}
	initrd, err := Initramfs(ctx, g.Root(), modules, agent)
	must(t, err)
	_, err = ImageFromTree(ctx, g, "tiny", tinyTree(t), TreeOptions{Size: testSize})
	must(t, err)
	base, err := BaseFile(ctx, g, "tiny", BaseDir(g.Root()))
	must(t, err)

	start := time.Now()
	qctx, qcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer qcancel()
	cmd := exec.CommandContext(qctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
		"-kernel", vmlinuz, "-initrd", initrd, "-append", Cmdline("tiny-box"),
		"-drive", "file="+base+",format=raw,if=virtio,snapshot=on",
		"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if qctx.Err() != nil {
		t.Fatalf("QEMU did not exit within 2 minutes; console:\n%s", out)
	}
	if err != nil {
		t.Fatalf("QEMU: %v; console:\n%s", err, out)
	}
	want := `fakeinit-ok modules=10 hostname=tiny-box root=/dev/vda eth0=true hello="#!/bin/sh\necho hello\n"`
	if !strings.Contains(string(out), want) {
		t.Fatalf("console lacks %q:\n%s", want, out)
	}
	t.Logf("booted, loaded the modules, mounted the root and powered off in %v", time.Since(start).Round(time.Millisecond))
}
