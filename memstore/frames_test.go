package memstore

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
)

// TestFaultFillsFrame restores a snapshot whose chunks compaction put in
// zstd frames, one page per fault, touched in random order: each fault on a
// framed page fills the missing pages near it of the same frame, so the
// memory comes back whole after a few faults a frame instead of one a page,
// and pages the overlay holds still come from the overlay. A page table
// kept from a restore before the compaction is resolved again.
func TestFaultFillsFrame(t *testing.T) {
	const pages = 2048 // 8 MiB: 1536 pages with data, in about 7 frames
	src := wordsImage(11, pages)
	newer := bytes.Clone(src)
	copy(newer[100*PageSize:], image(12, 50)) // pages 100..149, in the overlay
	for _, tc := range []struct {
		name    string
		overlay bool
		kept    bool // restored with Tables before the compaction
		want    []byte
	}{
		{"store alone", false, false, src},
		{"overlay over frames", true, false, newer},
		{"table kept from before", false, true, src},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
			capture(t, g, src, CaptureOptions{Name: "m"})
			tabs := NewTables(1 << 20)
			if tc.kept {
				restoreAndCheck(t, g, "m", src, tabs)
			}
			st, err := g.Store().Compact(context.Background(), cas.CompactOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if st.Frames == 0 {
				t.Fatalf("compaction wrote no frames: %+v", st)
			}
			opts := Options{FaultAround: 1, Prefetch: []uint64{}, Tables: tabs}
			if tc.overlay {
				opts.Overlay = overlayOf(t, newer, seq(100, 150), nil)
				defer opts.Overlay.Release()
			}
			order := allPages(pages)
			rand.New(rand.NewPCG(3, 4)).Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
			region := anon(t, len(src))
			r := start(t, g, "m", region, opts)
			touch(region, order, 1)
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(region, tc.want) {
				t.Fatal("restored memory differs from the snapshot")
			}
			s := r.Stats()
			// With one page per fault, each fault that is neither a repeat
			// nor a zero page copied one window: without the frames' pages
			// coming along, that is one fault a page with data (1536).
			copying := s.Faults - s.Repeats - s.Zeroed
			if copying > 100 {
				t.Errorf("%d faults copied pages in (stats %+v): a frame's pages did not come with the first of them", copying, s)
			}
			if s.Copied+s.Zeroed != pages {
				t.Errorf("filled %d+%d pages on faults, want %d", s.Copied, s.Zeroed, pages)
			}
		})
	}
}

// wordsImage is like image, with pages of words drawn at random where
// image repeats one line: zstd frames of many such pages are smaller than
// the pages compressed one by one, so compaction frames them.
func wordsImage(seed uint64, pages int) []byte {
	words := []string{"box ", "fork ", "page ", "store ", "frame ", "guest ", "memory ", "chunk ", "snapshot ", "resume "}
	r := rand.New(rand.NewPCG(seed, 2))
	b := image(seed, pages)
	for p := 2; p < pages; p += 4 {
		for _, q := range []int{p, p + 1} {
			var pg []byte
			for len(pg) < PageSize {
				pg = append(pg, words[r.IntN(len(words))]...)
			}
			copy(b[q*PageSize:(q+1)*PageSize], pg)
		}
	}
	return b
}
