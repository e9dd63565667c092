package integration

import (
	"context"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
)

// TestBoxLazyResume resumes hibernated boxes whose memory comes back from
// the store while they run (a QEMU postcopy migration served by boxd): a
// box that wrote a known pattern over 1 GiB of a 2 GiB guest reads every
// byte back; its QEMU killed while its memory is served leaves it
// hibernated in its snapshot, which resumes again; a fork of a box whose
// memory is still being served carries the same memory.
func TestBoxLazyResume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	e := newBoxEnv(ctx, t)
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "big", Memory: 2 << 30}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.run(ctx, t, "big", "mkdir -p /mnt/big && mount -t tmpfs -o size=1100m tmpfs /mnt/big && head -c 1073741824 /dev/urandom > /mnt/big/p", 0)
	sum := func(name string) string {
		t.Helper()
		return strings.Fields(e.run(ctx, t, name, "sha256sum /mnt/big/p", 0) + " x")[0]
	}
	want := sum("big")
	t.Logf("1 GiB written and summed in the guest in %v: %s", time.Since(start).Round(time.Millisecond), want)
	if _, err := e.mgr.Hibernate(ctx, "big"); err != nil {
		t.Fatal(err)
	}

	// QEMU killed while the memory is served: the box is hibernated in the
	// same snapshot again, and says why.
	bx, err := e.mgr.Resume(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	pids, _ := exec.Command("pgrep", "-f", bx.Disk).Output()
	pid, err := strconv.Atoi(strings.Fields(string(pids) + " x")[0])
	if err != nil {
		t.Fatalf("no QEMU for box big (disk %s): %q", bx.Disk, pids)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for {
		bx, err = e.mgr.Get("big")
		if err != nil {
			t.Fatal(err)
		}
		if bx.State != box.StateRunning {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("big still runs after its QEMU was killed")
		case <-time.After(20 * time.Millisecond):
		}
	}
	if bx.State != box.StateHibernated || !strings.Contains(bx.Note, "memory") {
		t.Fatalf("big after its QEMU was killed while its memory was served: %s (%s)", bx.State, bx.Note)
	}
	t.Logf("big after its QEMU was killed: %s (%s)", bx.State, bx.Note)

	// The next resume brings every byte back.
	start = time.Now()
	if _, err := e.mgr.Resume(ctx, "big"); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed in %v", time.Since(start).Round(time.Millisecond))
	// A fork at once, while the memory may still be on its way: the fork
	// waits for it and carries it.
	if _, err := e.mgr.Fork(ctx, "big", []string{"big-f"}); err != nil {
		t.Fatal(err)
	}
	if got := sum("big"); got != want {
		t.Fatalf("1 GiB read back after a lazy resume: sha256 %s, want %s", got, want)
	}
	if got := sum("big-f"); got != want {
		t.Fatalf("1 GiB read back in a fork of a lazily resumed box: sha256 %s, want %s", got, want)
	}
}
