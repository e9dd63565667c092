// Package testutil holds helpers that boxd's tests share.
package testutil

import (
	"context"
	"debug/elf"
	"os"
	"os/exec"
	"testing"
)

// BusyboxPath is where Debian's busybox-static installs busybox.
const BusyboxPath = "/bin/busybox"

// EnsurePackages installs, with apt-get, the Debian package named for each
// command or file that is missing, and fails the test if it cannot.
func EnsurePackages(ctx context.Context, t testing.TB, need map[string]string) {
	t.Helper()
	var missing []string
	for file, pkg := range need {
		if _, err := exec.LookPath(file); err != nil {
			missing = append(missing, pkg)
		}
	}
	if len(missing) == 0 {
		return
	}
	args := append([]string{"install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"}, missing...)
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("apt-get install %v: %v\n%s", missing, err, out)
	}
}

// StaticBusybox installs busybox-static if needed and checks that the
// busybox at BusyboxPath needs no dynamic loader, as an initramfs requires.
func StaticBusybox(ctx context.Context, t testing.TB) string {
	t.Helper()
	EnsurePackages(ctx, t, map[string]string{BusyboxPath: "busybox-static"})
	f, err := elf.Open(BusyboxPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatalf("%s is dynamically linked; the initramfs needs busybox-static's", BusyboxPath)
		}
	}
	return BusyboxPath
}
