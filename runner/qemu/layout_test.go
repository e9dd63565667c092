package qemu_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// A new machine's virtio-serial device offers NewLayout's two ports, one
// started on LegacyLayout (a box booted by an older boxd) QEMU's 31; a
// snapshot of either restores onto the device it was taken on, eagerly and
// lazily, and its guest goes on there.
func TestLayout(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, _, spec, work := diskMachine(ctx, t)
	ports := func(what string, m *qemu.Machine, want int) {
		t.Helper()
		n, err := qemu.SerialPorts(ctx, m)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if n != want {
			t.Errorf("%s: the virtio-serial device has %d ports, want %d", what, n, want)
		}
	}
	for _, tc := range []struct {
		layout string
		ports  int
	}{
		{"", 2},
		{qemu.LegacyLayout, 31},
	} {
		name := "layout-" + map[string]string{"": "new", qemu.LegacyLayout: "legacy"}[tc.layout]
		s := spec
		s.Layout = tc.layout
		overlay := filepath.Join(work, name+".qcow2")
		if err := qemu.CreateOverlay(ctx, overlay, filepath.Join(work, "disk.raw")); err != nil {
			t.Fatal(err)
		}
		s.Disk = &runner.Disk{Path: overlay, Base: spec.Disk.Base}
		m, err := r.StartMachine(ctx, s)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		diskStep(ctx, t, m, 2)
		ports(name, m, tc.ports)
		if _, err := m.Freeze(ctx, name, runner.SnapshotOptions{}); err != nil {
			t.Fatalf("%s: freeze: %v", name, err)
		}
		frozeAt := lastStep(m.Console())
		_ = m.Stop(ctx)
		r.ReleaseSnapshot(name)
		if _, err := r.Committed(ctx, name); err != nil {
			t.Fatal(err)
		}
		for _, lazy := range []bool{false, true} {
			what := map[bool]string{false: name + ", restored eagerly", true: name + ", restored lazily"}[lazy]
			m, err := r.RestoreMachine(ctx, name, runner.RestoreOptions{
				Disk: filepath.Join(work, name+map[bool]string{false: "-eager", true: "-lazy"}[lazy]+".qcow2"), LongLived: lazy,
			})
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			ports(what, m, tc.ports)
			if n, got := diskStep(ctx, t, m, frozeAt); got != "boxd-disk!" {
				t.Errorf("%s: step %d reading %q", what, n, got)
			}
			if lazy {
				if err := m.AwaitMemory(ctx); err != nil {
					t.Fatalf("%s: %v", what, err)
				}
			}
			_ = m.Stop(ctx)
		}
	}
}
