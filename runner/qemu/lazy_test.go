package qemu_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/memstore"
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
	r.ResumeSpares = 1
	// The push of the rest waits a while after the guest starts, so that
	// the first restore's guest asks for what it runs on and leaves a
	// working set: QEMU itself asks for nothing, guest RAM's first MiB
	// having gone before the devices.
	r.LazyGrace = 300 * time.Millisecond
	t.Cleanup(r.StopResumeSpares)
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
	if err := m.AwaitMemory(ctx); err != nil {
		t.Fatalf("the lazy restore's memory: %v", err)
	}
	first, ok := m.LazyStats()
	if !ok || !first.Done || first.Pushed == 0 {
		t.Fatalf("lazy restore stats %+v (%v)", first, ok)
	}
	// The push placed pages straight into QEMU's guest RAM (directRAM),
	// which the guest then ran on.
	if first.Placed == 0 {
		t.Errorf("the push placed no page straight into guest RAM: %+v", first)
	}
	t.Logf("first lazy restore: %+v", first)
	// A second restore of the snapshot pushes the working set the first
	// recorded before the guest asks, on the resume spare the first left.
	for r.WaitingResumeSpares() == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("no resume spare started after the first lazy restore")
		case <-time.After(10 * time.Millisecond):
		}
	}
	m2, err := r.RestoreMachine(ctx, "lazy-1", runner.RestoreOptions{
		Disk: filepath.Join(work, "b.qcow2"), LongLived: true,
	})
	if err != nil {
		t.Fatalf("second lazy restore: %v", err)
	}
	if n := r.WaitingResumeSpares(); n != 0 {
		t.Errorf("%d resume spares wait right after the second restore took the one there was", n)
	}
	diskStep(ctx, t, m2, frozeAt)
	// The runner's own wait (a boxd leaving its boxes running) returns
	// once the memory is in place.
	if err := r.AwaitRestores(ctx); err != nil {
		t.Fatal(err)
	}
	second, _ := m2.LazyStats()
	t.Logf("second lazy restore: %+v", second)
	if !second.Done {
		t.Errorf("AwaitRestores returned before the second restore's memory was in place: %+v", second)
	}
	// Once its memory is back, the spare it took is started again.
	for r.WaitingResumeSpares() == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("no resume spare started again after the second lazy restore had its memory")
		case <-time.After(10 * time.Millisecond):
		}
	}
	if second.Prefetched == 0 {
		t.Errorf("the second lazy restore prefetched no working set: %+v", second)
	}
	_ = m2.Stop(ctx)
	// Once the store is compacted (zstd frames of many chunks), a page
	// asked for brings the rest of its frame near it, decoded once; with
	// no working set to push, the guest asks for what it needs.
	if _, err := r.Graph.Store().Compact(ctx, cas.CompactOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := r.Graph.SetWorkingSet("lazy-1", memstore.DefaultMap, nil); err != nil {
		t.Fatal(err)
	}
	m3, err := r.RestoreMachine(ctx, "lazy-1", runner.RestoreOptions{
		Disk: filepath.Join(work, "c.qcow2"), LongLived: true,
	})
	if err != nil {
		t.Fatalf("lazy restore from the compacted store: %v", err)
	}
	if n, got := diskStep(ctx, t, m3, frozeAt); got != "boxd-disk!" || n > frozeAt+10 {
		t.Fatalf("lazy restore from the compacted store: step %d reading %q; the parent froze at %d", n, got, frozeAt)
	}
	if err := m3.AwaitMemory(ctx); err != nil {
		t.Fatalf("the memory of the lazy restore from the compacted store: %v", err)
	}
	third, _ := m3.LazyStats()
	t.Logf("lazy restore from the compacted store: %+v", third)
	if third.Demanded == 0 || third.Framed == 0 {
		t.Errorf("a lazy restore from a compacted store with no working set sent no page with a demanded one of its frame: %+v", third)
	}
	_ = m3.Stop(ctx)
	if _, err := m.Snapshot(ctx, "lazy-2", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatalf("snapshot after a lazy restore: %v", err)
	}
	n, _ := diskStep(ctx, t, m, 0)
	if n2, _ := diskStep(ctx, t, m, n); n2 <= n {
		t.Fatalf("no progress after the snapshot")
	}
}
