package testutil

import (
	"os"
	"os/exec"
	"testing"
)

// MountTmpfs mounts a tmpfs with the mount(8) options opts (as "size=1m,ro";
// "" for none) on the existing folder dir until the test ends, skipping the
// test when it does not run as root and failing it when mounting fails.
func MountTmpfs(t testing.TB, dir, opts string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("mounting a tmpfs needs root (running as uid %d)", os.Geteuid())
	}
	args := []string{"-t", "tmpfs"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	if out, err := exec.Command("mount", append(args, "tmpfs", dir)...).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs on %s: %v: %s", dir, err, out)
	}
	t.Cleanup(func() {
		// A file system something still holds open is detached lazily, and
		// the test fails only when even that does not work.
		if _, err := exec.Command("umount", dir).CombinedOutput(); err == nil {
			return
		}
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
}
