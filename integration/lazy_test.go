package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
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

// TestDaemonKilledDuringLazyResume kills the daemon with -9 while it serves
// a resuming box's memory, once during the resume and once after it (the
// daemon holds the rest of the memory back for a while, --lazy-grace): the
// next daemon finds the box hibernated in its snapshot, with its
// half-restored QEMU gone, and resumes it whole.
func TestDaemonKilledDuringLazyResume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	d := newDaemonEnv(ctx, t, "--lazy-grace", "1m")
	d.cli(t, "create", "w", "--memory", "1G", "--ssh-key", d.key+".pub")
	out, _, code := d.ssh(t, d.key, "w", "mkdir -p /mnt/x && mount -t tmpfs -o size=400m tmpfs /mnt/x && head -c 314572800 /dev/urandom > /mnt/x/p && sha256sum /mnt/x/p")
	if code != 0 {
		t.Fatalf("filling w: exit %d: %s", code, out)
	}
	want := strings.Fields(out + " x")[0]
	d.cli(t, "hibernate", "w")
	state := func() string {
		t.Helper()
		for _, b := range d.boxes(t) {
			if b.Name == "w" {
				t.Logf("w: %s (%s)", b.State, b.Note)
				return b.State
			}
		}
		t.Fatal("no box w")
		return ""
	}

	for _, during := range []bool{true, false} {
		resume := exec.Command(d.boxd, "--root", d.root, "resume", "w")
		resume.Env = d.env
		if err := resume.Start(); err != nil {
			t.Fatal(err)
		}
		if !during {
			if err := resume.Wait(); err != nil {
				t.Fatalf("boxd resume w: %v", err)
			}
			if s := state(); s != "running" {
				t.Fatalf("w after boxd resume: %s", s)
			}
		}
		// The daemon dies while w's machine serves its memory (its state
		// file says so).
		snap := restoringSnapshot(ctx, t, d.root)
		killed := d.kill(t)
		_ = resume.Wait()
		t.Logf("daemon %d killed while w's memory came back from %s (during the resume: %v)", killed, snap, during)
		d.start(t)
		if s := state(); s != "hibernated" {
			t.Fatalf("w after the daemon was killed mid-restore: %s, want hibernated", s)
		}
		if left := qemusOf(memFolder(t, d.root)); len(left) != 0 {
			t.Fatalf("QEMUs left after the new daemon reclaimed: %v", left)
		}
	}
	d.cli(t, "resume", "w")
	if out, _, code := d.ssh(t, d.key, "w", "sha256sum /mnt/x/p"); code != 0 || strings.Fields(out + " x")[0] != want {
		t.Fatalf("w's 300 MiB after the resume that followed the kills: %q (exit %d), want %s", out, code, want)
	}
}

// restoringSnapshot waits until a machine under root's run folder serves
// its memory lazily and returns the snapshot it comes from.
func restoringSnapshot(ctx context.Context, t *testing.T, root string) string {
	t.Helper()
	for {
		files, _ := filepath.Glob(filepath.Join(root, "run", "*", "state.json"))
		for _, f := range files {
			var st struct {
				Ready     bool
				Restoring string
			}
			if b, err := os.ReadFile(f); err == nil && json.Unmarshal(b, &st) == nil && !st.Ready && st.Restoring != "" {
				return st.Restoring
			}
		}
		select {
		case <-ctx.Done():
			t.Fatal("no machine ever served its memory lazily")
		case <-time.After(2 * time.Millisecond):
		}
	}
}
