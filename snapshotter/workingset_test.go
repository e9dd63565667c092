package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
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

// TestCompactKeepsWorkingSets compacts a graph whose snapshot has a working
// set: the chunks of its pages stay out of frames (a lazy resume pushes them
// first), the rest go into frames, and the map reads back the same.
func TestCompactKeepsWorkingSets(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	var data []byte
	for p := range 300 {
		line := fmt.Sprintf("page %d of a memory map that compresses well in a frame; ", p)
		data = append(data, bytes.Repeat([]byte(line), cas.ChunkSize/len(line)+1)[:cas.ChunkSize]...)
	}
	if _, err := g.Ingest(context.Background(), bytes.NewReader(data), IngestOptions{Name: "m", Kind: KindMemory}); err != nil {
		t.Fatal(err)
	}
	ws := []uint64{200, 3, 50, 51, 1 << 30} // out of order, one beyond the map
	if err := g.SetWorkingSet("m", "memory", ws); err != nil {
		t.Fatal(err)
	}
	hot, err := g.WorkingSetChunks()
	if err != nil {
		t.Fatal(err)
	}
	r, err := g.OpenMap("m", "memory")
	if err != nil {
		t.Fatal(err)
	}
	if len(hot) != 4 {
		t.Fatalf("WorkingSetChunks: %d chunks, want the 4 of pages 3, 50, 51 and 200", len(hot))
	}
	st, err := g.Compact(context.Background(), cas.CompactOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.ChunksKept != 4 || st.Frames == 0 {
		t.Errorf("compaction kept %d chunks out of %d frames, want 4 kept", st.ChunksKept, st.Frames)
	}
	for p := range uint64(300) {
		loc, err := g.Store().Lookup(r.Block(p))
		if err != nil {
			t.Fatal(err)
		}
		_, inWS := hot[r.Block(p)]
		if framed := loc.Codec == cas.CodecZstd; framed == inWS {
			t.Errorf("page %d (in the working set: %v) is stored %s", p, inWS, loc.Codec)
		}
	}
	checkExport(t, g, "m", "memory", data)
}
