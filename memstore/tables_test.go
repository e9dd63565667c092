package memstore

import (
	"bytes"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
)

// TestTables restores through kept page tables: one kept from an earlier
// restore, one derived from the parent's, and one whose locations went
// stale (as after GC moved the chunks); each gives the snapshot's memory.
func TestTables(t *testing.T) {
	const pages = 512
	base := image(6, pages)
	child := bytes.Clone(base)
	copy(child[100*PageSize:], image(7, 30))
	changed := seq(100, 130)
	for _, tc := range []struct {
		name  string
		snap  string
		want  []byte
		setup func(t *testing.T, g *snapshotter.Graph, tabs *Tables)
	}{
		{"kept from a restore", "base", base, func(t *testing.T, g *snapshotter.Graph, tabs *Tables) {
			restoreAndCheck(t, g, "base", base, tabs)
		}},
		{"derived from the parent's", "child", child, func(t *testing.T, g *snapshotter.Graph, tabs *Tables) {
			restoreAndCheck(t, g, "base", base, tabs)
			if err := tabs.Derive(g, "base", "child", "", changed); err != nil {
				t.Fatal(err)
			}
		}},
		{"stale locations", "base", base, func(t *testing.T, g *snapshotter.Graph, tabs *Tables) {
			restoreAndCheck(t, g, "base", base, tabs)
			tab := tabs.get(mustKey(t, g, "base"))
			for i := range tab.locs {
				tab.locs[i].Pack += 1000
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
			capture(t, g, base, CaptureOptions{Name: "base"})
			capture(t, g, child, CaptureOptions{Name: "child", Parent: "base", Dirty: bitmapOf(pages, changed)})
			tabs := NewTables(1 << 20)
			tc.setup(t, g, tabs)
			if tabs.get(mustKey(t, g, tc.snap)) == nil {
				t.Fatalf("no table kept for %s", tc.snap)
			}
			restoreAndCheck(t, g, tc.snap, tc.want, tabs)
		})
	}
}

func TestTablesDropLeastRecentlyUsed(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	tabs := NewTables(2 * 64)
	for _, n := range []string{"a", "b", "c"} {
		capture(t, g, image(8, 64), CaptureOptions{Name: n})
		restoreAndCheck(t, g, n, image(8, 64), tabs)
	}
	for n, want := range map[string]bool{"a": false, "b": true, "c": true} {
		if got := tabs.get(mustKey(t, g, n)) != nil; got != want {
			t.Errorf("table of %s kept: %v, want %v", n, got, want)
		}
	}
}

// TestTablesNameUsedAgain restores a snapshot, removes it and makes
// another of the same name: its restore is of the new one, not the table
// kept of the old.
func TestTablesNameUsedAgain(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	tabs := NewTables(1 << 20)
	capture(t, g, image(9, 64), CaptureOptions{Name: "x"})
	restoreAndCheck(t, g, "x", image(9, 64), tabs)
	if err := g.Remove("x"); err != nil {
		t.Fatal(err)
	}
	capture(t, g, image(10, 64), CaptureOptions{Name: "x"})
	restoreAndCheck(t, g, "x", image(10, 64), tabs)
}

func mustKey(t *testing.T, g *snapshotter.Graph, snap string) tableKey {
	t.Helper()
	k, err := keyOf(g, snap, DefaultMap)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// restoreAndCheck restores snap with tabs and compares it with want.
func restoreAndCheck(t *testing.T, g *snapshotter.Graph, snap string, want []byte, tabs *Tables) {
	t.Helper()
	region := anon(t, len(want))
	r := start(t, g, snap, region, Options{Prefetch: []uint64{}, Tables: tabs})
	touch(region, allPages(len(want)/PageSize), 1)
	if !bytes.Equal(region, want) {
		t.Fatalf("restore of %s differs", snap)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

func bitmapOf(pages int, set []uint64) Bitmap {
	b := NewBitmap(pages)
	for _, p := range set {
		b.Set(int(p))
	}
	return b
}
