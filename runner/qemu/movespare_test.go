package qemu_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// TestMoveSpares: spares on a machine's own memory file carry on from a Freeze of it, as the machine going on
// and its fork would, each from where it froze, nothing copied; spares of a machine that stops without a freeze
// stop with it, and its memory file goes once it stopped, not before.
func TestMoveSpares(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, _, spec, work := diskMachine(ctx, t)
	var logs testutil.LockedBuffer
	r.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	parent, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = parent.Stop(context.Background()) })
	if !parent.OwnsMemory() {
		t.Fatal("a started machine does not own its memory")
	}
	before, _ := diskStep(ctx, t, parent, 2)
	if err := parent.StartMoveSpares(ctx, 2); err != nil {
		t.Fatal(err)
	}
	before, _ = diskStep(ctx, t, parent, before+3)
	if _, err := parent.Freeze(ctx, "move-fork", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	frozeAt := lastStep(parent.Console())
	if frozeAt < before {
		t.Fatalf("the parent's console ends at step %d, before %d", frozeAt, before)
	}
	for i := range 2 {
		k, err := r.RestoreMachine(ctx, "move-fork", runner.RestoreOptions{
			Disk: filepath.Join(work, "moved-"+strconv.Itoa(i)+".qcow2"), Console: filepath.Join(work, "moved-console-"+strconv.Itoa(i)),
		})
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		t.Cleanup(func() { _ = k.Stop(context.Background()) })
		if n, got := diskStep(ctx, t, k, frozeAt); got != "boxd-disk!" || n > frozeAt+10 {
			t.Errorf("restore %d: step %d reading %q; the parent froze at %d", i, n, got, frozeAt)
		}
		if k.OwnsMemory() {
			t.Errorf("restore %d owns its memory; want the frozen file mapped copy-on-write", i)
		}
	}
	if n := strings.Count(logs.String(), "restore took a spare"); n != 2 {
		t.Errorf("%d restores took a spare, want 2", n)
	}

	// A machine that stops without a freeze takes its spares with it; its memory file stays while it runs.
	otherDisk := filepath.Join(work, "other.qcow2")
	if err := qemu.CreateOverlay(ctx, otherDisk, filepath.Join(work, "disk.raw")); err != nil {
		t.Fatal(err)
	}
	spec.Disk = &runner.Disk{Path: otherDisk, Base: spec.Disk.Base}
	other, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	diskStep(ctx, t, other, 1)
	if err := other.StartMoveSpares(ctx, 1); err != nil {
		t.Fatal(err)
	}
	mem := other.MemoryFile()
	if err := other.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mem); !os.IsNotExist(err) {
		t.Errorf("the memory file of a stopped machine is still there: %v", err)
	}
}
