package initramfs_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/guestkernel"
	"github.com/boxd-dev/boxd/internal/initramfs"
	"github.com/boxd-dev/boxd/internal/testutil"
)

// boxModules are the drivers a box needs: the PCI transport, the agent channel, the disk and the network.
var boxModules = []string{"virtio_pci", "virtio_console", "virtio_blk", "virtio_net"}

const busyboxPath = testutil.BusyboxPath

// TestBootCloudKernel builds an initramfs with busybox and the virtio modules in resolved order, boots the
// Debian cloud kernel on it under QEMU (TCG), and checks that every module loaded and the guest powered off.
func TestBootCloudKernel(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Linux guest under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	testutil.EnsurePackages(ctx, t, map[string]string{"qemu-system-x86_64": "qemu-system-x86"})
	testutil.StaticBusybox(ctx, t)

	start := time.Now()
	cache, err := guestkernel.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	kernel, err := guestkernel.Fetch(ctx, cache)
	if err != nil {
		t.Fatalf("cannot fetch the guest kernel, so cannot boot it: %v", err)
	}
	t.Logf("kernel %s in %s (fetch %v)", kernel.Release, kernel.Root, time.Since(start).Round(time.Millisecond))

	mods, err := initramfs.ScanModules(kernel.ModulesDir)
	if err != nil {
		t.Fatal(err)
	}
	order, err := mods.LoadOrder(boxModules...)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range order {
		names = append(names, m.Name)
	}
	t.Logf("%d modules scanned; load order: %s", len(mods), strings.Join(names, " "))

	initrd := filepath.Join(t.TempDir(), "initrd.gz")
	buildInitramfs(t, initrd, order)

	start = time.Now()
	qctx, qcancel := context.WithTimeout(ctx, 120*time.Second)
	defer qcancel()
	cmd := exec.CommandContext(qctx, "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
		"-kernel", kernel.Vmlinuz, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet")
	var console testutil.LockedBuffer
	cmd.Stdout, cmd.Stderr = &console, &console
	cmd.WaitDelay = 5 * time.Second
	err = cmd.Run() // CommandContext kills QEMU when qctx expires
	elapsed := time.Since(start)
	out := console.String()
	if qctx.Err() != nil {
		t.Fatalf("QEMU did not exit within 120 s (killed); console:\n%s", out)
	}
	if err != nil {
		t.Fatalf("QEMU: %v; console:\n%s", err, out)
	}
	m := regexp.MustCompile(`boxd-initramfs-ok (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no boxd-initramfs-ok marker on the serial console; console:\n%s", out)
	}
	if m[1] != fmt.Sprint(len(order)) {
		t.Fatalf("guest reports %s modules loaded, want %d; console:\n%s", m[1], len(order), out)
	}
	t.Logf("booted, loaded %s modules and powered off in %v", m[1], elapsed.Round(time.Millisecond))
}

// buildInitramfs writes a gzip initramfs: busybox and its applet links, the modules, and an /init that loads
// them in order, reports how many /proc/modules lists, and powers off.
func buildInitramfs(t *testing.T, path string, order []initramfs.Module) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := initramfs.NewGzipWriter(f)
	var script strings.Builder
	script.WriteString("#!/bin/sh\nmount -t proc proc /proc\n")
	for _, m := range order {
		fmt.Fprintf(&script, "insmod /lib/modules/%s.ko || echo boxd-initramfs-insmod-failed %s\n", m.Name, m.Name)
	}
	script.WriteString("echo \"boxd-initramfs-ok $(grep -c . /proc/modules)\"\npoweroff -f\n")

	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"/bin", "/sbin", "/dev", "/proc", "/sys", "/tmp"} {
		check(w.Dir(d, 0o755))
	}
	check(w.CharDev("/dev/console", 0o600, 5, 1))
	check(w.CopyFile("/bin/busybox", 0o755, busyboxPath))
	for _, applet := range []string{"sh", "mount", "insmod", "grep", "cat", "echo"} {
		check(w.Symlink("/bin/"+applet, "busybox"))
	}
	check(w.Symlink("/sbin/poweroff", "../bin/busybox"))
	for _, m := range order {
		check(w.CopyFile("/lib/modules/"+m.Name+".ko", 0o644, m.Path))
	}
	check(w.File("/init", 0o755, []byte(script.String())))
	check(w.Close())
	check(f.Close())
	if fi, err := os.Stat(path); err == nil {
		t.Logf("initramfs %d bytes", fi.Size())
	}
}
