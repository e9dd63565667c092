package box_test

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
)

// usageOf measures box name alone.
func usageOf(t *testing.T, e *fakeEnv, name string, opts box.UsageOptions) box.Usage {
	t.Helper()
	us, err := e.mgr.Usage(context.Background(), []string{name}, opts)
	if err != nil || len(us) != 1 || us[0].Name != name {
		t.Fatalf("Usage of %s: %+v, %v", name, us, err)
	}
	return us[0]
}

func TestFakeUsage(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	before := time.Now()
	e.create(t, "dev")
	e.create(t, "other")

	u := usageOf(t, e, "dev", box.UsageOptions{})
	if u.State != box.StateRunning || u.Runner != "fake" || u.CPUs != box.DefaultCPUs || u.GuestMemory != box.DefaultMemory {
		t.Errorf("usage of a running box: %+v", u)
	}
	if u.Started.Before(before) || u.Started.After(u.At) {
		t.Errorf("started %v: want between the create (%v) and the measurement (%v)", u.Started, before, u.At)
	}
	if u.CPUSeconds == nil || *u.CPUSeconds <= 0 {
		t.Errorf("CPU seconds of a running box on a runner.CPUMeter: %v", u.CPUSeconds)
	}
	if u.HostMemory == nil || *u.HostMemory != fakeMemory {
		t.Errorf("host memory of a running box on a runner.MemoryMeter: %v, want %+v", u.HostMemory, fakeMemory)
	}
	if u.Store != nil {
		t.Errorf("store figures not asked for: %+v", u.Store)
	}
	m := e.machine(t, "dev")
	if err := os.WriteFile(m.Disk(), make([]byte, 100<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	u = usageOf(t, e, "dev", box.UsageOptions{})
	var st syscall.Stat_t
	if err := syscall.Stat(m.Disk(), &st); err != nil {
		t.Fatal(err)
	}
	if want := (box.DiskUse{Path: m.Disk(), Allocated: st.Blocks * 512, Size: 100 << 10}); u.Disk == nil || *u.Disk != want {
		t.Errorf("disk: %+v, want %+v", u.Disk, want)
	}

	// Every box, by name; an unknown one is not found.
	all, err := e.mgr.Usage(ctx, nil, box.UsageOptions{})
	if err != nil || len(all) != 2 || all[0].Name != "dev" || all[1].Name != "other" {
		t.Fatalf("Usage of every box: %+v, %v", all, err)
	}
	if _, err := e.mgr.Usage(ctx, []string{"dev", "nope"}, box.UsageOptions{}); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("Usage of an unknown box: %v, want ErrNotFound", err)
	}

	// A stopped box has no machine figures, and keeps its disk.
	if _, err := e.mgr.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	u = usageOf(t, e, "dev", box.UsageOptions{})
	if u.State != box.StateStopped || !u.Started.IsZero() || u.CPUSeconds != nil || u.HostMemory != nil || u.Disk == nil {
		t.Errorf("usage of a stopped box: %+v", u)
	}
	// Uptime counts from the machine's start, not the box's.
	restarted := time.Now()
	if _, err := e.mgr.Start(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if u = usageOf(t, e, "dev", box.UsageOptions{}); u.Started.Before(restarted) {
		t.Errorf("started %v after a start at %v", u.Started, restarted)
	}
	hib := time.Now()
	if _, err := e.mgr.Hibernate(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if u = usageOf(t, e, "dev", box.UsageOptions{}); u.State != box.StateHibernated || !u.Started.IsZero() {
		t.Errorf("usage of a hibernated box: %+v", u)
	}
	if _, err := e.mgr.Resume(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if u = usageOf(t, e, "dev", box.UsageOptions{}); u.Started.Before(hib) || u.CPUSeconds == nil {
		t.Errorf("usage after a resume: %+v, want started after %v", u, hib)
	}
}

// Each fake snapshot's memory is a chunk of its own; the disk is the
// image's, which is no box's alone.
func TestFakeUsageStore(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	e.create(t, "other")
	store := func(name string) int64 {
		t.Helper()
		u := usageOf(t, e, name, box.UsageOptions{Store: true})
		if u.Store == nil {
			t.Fatalf("no store figures for %s", name)
		}
		if (u.Store.Chunks == 0) != (u.Store.StoredBytes == 0) {
			t.Fatalf("store figures of %s: %+v", name, u.Store)
		}
		return u.Store.Chunks
	}
	if n := store("dev"); n != 0 {
		t.Fatalf("a box without snapshots holds %d chunks alone", n)
	}
	for range 2 {
		if _, err := e.mgr.Snapshot(ctx, "dev", ""); err != nil {
			t.Fatal(err)
		}
	}
	if n := store("dev"); n != 2 {
		t.Errorf("after two snapshots: %d chunks, want 2", n)
	}
	if n := store("other"); n != 0 {
		t.Errorf("another box: %d chunks, want 0", n)
	}
	// Measured again once the snapshots change.
	if _, err := e.mgr.Snapshot(ctx, "dev", "s3"); err != nil {
		t.Fatal(err)
	}
	if n := store("dev"); n != 3 {
		t.Errorf("after a third snapshot: %d chunks, want 3", n)
	}
}
