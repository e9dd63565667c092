package box_test

import (
	"bytes"
	"context"
	"errors"
	"maps"
	"testing"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// A box made from a snapshot with a disk map that is no image (a root file
// system containerd's snapshotter committed): its disk stands on that
// snapshot, and so do its forks' and a box made from its snapshot.
func TestFakeRootfsBox(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	if _, err := e.g.Ingest(ctx, bytes.NewReader(bytes.Repeat([]byte("container root\n"), 4096)), snapshotter.IngestOptions{Name: "ctd-7"}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"containerd.namespace": "default", "containerd.id": "web"}
	bx, err := e.mgr.Create(ctx, box.CreateOptions{Name: "ctr", BaseSnapshot: "ctd-7", Labels: labels})
	if err != nil {
		t.Fatalf("Create from a root file system: %v", err)
	}
	if bx.Image != "" || bx.BaseSnapshot != "ctd-7" || !maps.Equal(bx.Labels, labels) || bx.State != box.StateRunning {
		t.Fatalf("box from a root file system: %+v", bx)
	}
	if base := e.machine(t, "ctr").spec.Disk.Base; base != "ctd-7" {
		t.Fatalf("the machine's disk stands on %q, want ctd-7", base)
	}

	kids, err := e.mgr.Fork(ctx, "ctr", []string{"kid"})
	if err != nil {
		t.Fatal(err)
	}
	if kids[0].BaseSnapshot != "ctd-7" || kids[0].Labels != nil {
		t.Fatalf("fork: base %q labels %v, want ctd-7 and none", kids[0].BaseSnapshot, kids[0].Labels)
	}
	s, err := e.mgr.Snapshot(ctx, "ctr", "cp")
	if err != nil {
		t.Fatal(err)
	}
	from, err := e.mgr.CreateFrom(ctx, box.FromOptions{Name: "back", Snapshot: s.Name, Labels: labels})
	if err != nil {
		t.Fatalf("CreateFrom: %v", err)
	}
	if from.BaseSnapshot != "ctd-7" || from.Image != "" || !maps.Equal(from.Labels, labels) {
		t.Fatalf("box from the snapshot: base %q image %q labels %v", from.BaseSnapshot, from.Image, from.Labels)
	}
	// With the box gone, the snapshot's chain still says where it started:
	// the fork's snapshot outlives it, which kid stands on.
	if err := e.mgr.Remove(ctx, "ctr"); err != nil {
		t.Fatal(err)
	}
	orphan, err := e.mgr.CreateFrom(ctx, box.FromOptions{Name: "orphan", Snapshot: kids[0].Snapshot})
	if err != nil {
		t.Fatalf("CreateFrom the fork's snapshot: %v", err)
	}
	if orphan.BaseSnapshot != "ctd-7" || orphan.Image != "" {
		t.Fatalf("box from a snapshot of a removed box: base %q image %q", orphan.BaseSnapshot, orphan.Image)
	}

	for _, tc := range []struct {
		what string
		opts box.CreateOptions
		want error
	}{
		{"an unknown snapshot", box.CreateOptions{Name: "x1", BaseSnapshot: "ctd-404"}, errdefs.ErrNotFound},
		{"an image and a snapshot", box.CreateOptions{Name: "x2", BaseSnapshot: "ctd-7", Image: fakeImage}, errdefs.ErrInvalidArgument},
	} {
		if _, err := e.mgr.Create(ctx, tc.opts); !errors.Is(err, tc.want) {
			t.Errorf("Create from %s: %v, want %v", tc.what, err, tc.want)
		}
		if _, err := e.mgr.Get(tc.opts.Name); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("Create from %s left box %s: %v", tc.what, tc.opts.Name, err)
		}
	}
}
