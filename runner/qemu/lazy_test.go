package qemu_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
)

// TestLazyRestore restores a machine whose snapshot is only in the store
// with its memory served while it runs (a postcopy migration from boxd):
// it carries on where it stopped, and its snapshot after holds its memory.
func TestLazyRestore(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, _, spec, work := diskMachine(ctx, t)
	frozeAt := frozenMachine(ctx, t, r, spec, "lazy-1")
	r.ReleaseSnapshot("lazy-1")
	if _, err := r.Committed(ctx, "lazy-1"); err != nil {
		t.Fatal(err)
	}
	if left := r.FrozenFiles(); len(left) != 0 {
		t.Fatalf("frozen files left: %v", left)
	}
	m, err := r.RestoreMachine(ctx, "lazy-1", runner.RestoreOptions{
		Disk: filepath.Join(work, "a.qcow2"), LongLived: true,
	})
	if err != nil {
		t.Fatalf("lazy restore: %v", err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	if n, got := diskStep(ctx, t, m, frozeAt); got != "boxd-disk!" || n > frozeAt+10 {
		t.Fatalf("lazy restore: step %d reading %q; the parent froze at %d", n, got, frozeAt)
	}
	if _, err := m.Snapshot(ctx, "lazy-2", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatalf("snapshot after a lazy restore: %v", err)
	}
	n, _ := diskStep(ctx, t, m, 0)
	if n2, _ := diskStep(ctx, t, m, n); n2 <= n {
		t.Fatalf("no progress after the snapshot")
	}
}
