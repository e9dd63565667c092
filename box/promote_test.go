package box_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/box"
)

// Promote makes a fork the box it came from; the box's state before stays
// as a snapshot for as long as the box exists, with the disks it stands
// on, and everything goes when the box is removed.
func TestFakePromote(t *testing.T) {
	for _, forker := range []bool{false, true} {
		t.Run(map[bool]string{false: "snapshot-and-restores", true: "forker"}[forker], func(t *testing.T) {
			e := newFakeEnv(t, forker)
			ctx := context.Background()
			e.create(t, "warm")
			if _, err := e.mgr.Fork(ctx, "warm", []string{"job-1", "other"}); err != nil {
				t.Fatal(err)
			}
			if _, _, err := e.mgr.Promote(ctx, "job-1", "warm"); !errors.Is(err, box.ErrInvalidState) {
				t.Fatalf("promote of a box that is not a fork of it: %v, want ErrInvalidState", err)
			}
			if _, _, err := e.mgr.Promote(ctx, "warm", "nope"); !errors.Is(err, box.ErrNotFound) {
				t.Fatalf("promote of an unknown fork: %v, want ErrNotFound", err)
			}
			job := e.state(t, "job-1")
			bx, kept, err := e.mgr.Promote(ctx, "warm", "job-1")
			if err != nil {
				t.Fatalf("Promote: %v", err)
			}
			if bx.Name != "warm" || bx.State != box.StateRunning || bx.Parent != "" || !strings.HasPrefix(kept, "box.warm.") || !strings.HasSuffix(kept, "-promoted") {
				t.Fatalf("promoted %+v, kept %q", bx, kept)
			}
			if _, err := e.mgr.Get("job-1"); !errors.Is(err, box.ErrNotFound) {
				t.Fatalf("the fork's name is still a box: %v", err)
			}
			// The promoted box carries on from the fork's disk, with warm's
			// hostname.
			chain := e.r.DiskChain(bx.Disk)
			found := false
			for _, f := range chain {
				found = found || strings.HasPrefix(filepath.Base(f), "job-1-")
			}
			if !found {
				t.Fatalf("the promoted box's disk chain %v does not stand on the fork's disk %s", chain, job.Disk)
			}
			if h, _, _ := e.machine(t, "warm").sys.get(); h != "warm" {
				t.Fatalf("the promoted box's hostname %q", h)
			}
			if got := run(ctx, t, e.mgr, "warm", "echo promoted"); got != "promoted\n" {
				t.Fatalf("exec in the promoted box: %q", got)
			}
			// The kept snapshot survives removals (collect) and the
			// promoted box's own life.
			if _, err := e.mgr.Fork(ctx, "warm", []string{"job-2"}); err != nil {
				t.Fatal(err)
			}
			for _, n := range []string{"job-2", "other"} {
				if err := e.mgr.Remove(ctx, n); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := e.mgr.Hibernate(ctx, "warm"); err != nil {
				t.Fatal(err)
			}
			s, err := e.g.Get(kept)
			if err != nil {
				t.Fatalf("the kept snapshot %s was collected: %v", kept, err)
			}
			for _, f := range e.r.DiskChain(e.r.SnapshotDisk(s)) {
				if _, err := os.Stat(f); err != nil {
					t.Fatalf("a disk the kept snapshot stands on was removed: %v", err)
				}
			}
			if _, err := e.mgr.CreateFrom(ctx, box.FromOptions{Name: "back", Snapshot: kept}); err != nil {
				t.Fatalf("CreateFrom the kept snapshot: %v", err)
			}
			for _, n := range []string{"back", "warm"} {
				if err := e.mgr.Remove(ctx, n); err != nil {
					t.Fatal(err)
				}
			}
			snaps, err := e.g.List()
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range snaps {
				if strings.HasPrefix(s.Name, "box.") {
					t.Errorf("snapshot %s left after every box was removed", s.Name)
				}
			}
			left, _ := os.ReadDir(filepath.Join(e.root, "disks"))
			for _, f := range left {
				t.Errorf("disk file %s left after every box was removed", f.Name())
			}
		})
	}
}
