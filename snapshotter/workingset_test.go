package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

func TestWorkingSet(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	data := bytes.Repeat([]byte("x"), 8*cas.ChunkSize)
	for _, s := range []struct{ name, parent string }{{"a", ""}, {"b", "a"}, {"c", "b"}} {
		if _, err := g.Ingest(context.Background(), bytes.NewReader(data), IngestOptions{Name: s.name, Parent: s.parent, Kind: KindMemory}); err != nil {
			t.Fatal(err)
		}
	}
	if ws, from, err := g.WorkingSet("c", "memory"); err != nil || ws != nil || from != "" {
		t.Fatalf("no working set recorded: got %v from %q (%v)", ws, from, err)
	}
	pages := []uint64{7, 0, 3, 3, 1 << 40, 2}
	if err := g.SetWorkingSet("a", "memory", pages); err != nil {
		t.Fatal(err)
	}
	for _, snap := range []string{"a", "b", "c"} {
		ws, from, err := g.WorkingSet(snap, "memory")
		if err != nil || from != "a" || !slices.Equal(ws, pages) {
			t.Errorf("%s: got %v from %q (%v), want a's", snap, ws, from, err)
		}
	}
	if err := g.SetWorkingSet("b", "memory", []uint64{5}); err != nil {
		t.Fatal(err)
	}
	if ws, from, _ := g.WorkingSet("c", "memory"); from != "b" || !slices.Equal(ws, []uint64{5}) {
		t.Errorf("c inherits %v from %q, want [5] from b", ws, from)
	}
	if err := g.SetWorkingSet("nope", "memory", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("working set of an unknown snapshot: %v", err)
	}
	if err := g.Remove("c"); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove("b"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Ingest(context.Background(), bytes.NewReader(data), IngestOptions{Name: "b", Parent: "a", Kind: KindMemory}); err != nil {
		t.Fatal(err)
	}
	if _, from, _ := g.WorkingSet("b", "memory"); from != "a" {
		t.Errorf("a new b must not inherit the removed b's working set (came from %q)", from)
	}
}

func FuzzDecodeWorkingSet(f *testing.F) {
	f.Add([]byte{0})
	f.Add([]byte{3, 2, 4, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		pages, err := decodeWorkingSet(b)
		if err != nil {
			return
		}
		if uint64(len(pages)) > uint64(len(b)) {
			t.Fatalf("%d pages from %d bytes", len(pages), len(b))
		}
	})
}
