package memstore

import (
	"bytes"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// TestReadahead walks windows through a readahead, as the fault handler
// does (window, copy, after): each window's data is the image's, pages
// ahead are read only while the windows follow one another, and a page
// ahead that cannot be read fails only its own window.
func TestReadahead(t *testing.T) {
	const pages = 128
	src := image(9, pages)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	mr, err := g.OpenMap("m", DefaultMap)
	if err != nil {
		t.Fatal(err)
	}
	type step struct {
		p, n         int
		first, held  int  // the pages held after the window
		wantErr      bool // the window cannot be read
		presentAhead int  // mark this page present before the window (0: none)
	}
	for _, tc := range []struct {
		name  string
		bad   int // a page whose chunk is missing from the store (-1: none)
		steps []step
	}{
		{"in order, one page each", -1, []step{
			{p: 0, n: 1, first: 0, held: 1},
			{p: 1, n: 1, first: 2, held: minAhead},
			{p: 2, n: 1, first: 2, held: minAhead},
			{p: 3, n: 1, first: 2, held: minAhead},
			{p: 4, n: 1, first: 2, held: minAhead},
			{p: 5, n: 1, first: 6, held: 2 * minAhead},
			{p: 6, n: 1, first: 6, held: 2 * minAhead},
		}},
		{"a jump starts over", -1, []step{
			{p: 10, n: 1, first: 10, held: 1},
			{p: 11, n: 1, first: 12, held: minAhead},
			{p: 40, n: 1, first: 40, held: 1},
			{p: 41, n: 1, first: 42, held: minAhead},
		}},
		{"a page held is in order", -1, []step{
			{p: 20, n: 1, first: 20, held: 1},
			{p: 21, n: 1, first: 22, held: minAhead},
			{p: 24, n: 2, first: 26, held: 2 * minAhead},
		}},
		{"windows in order", -1, []step{
			{p: 0, n: 16, first: 0, held: 16},
			{p: 16, n: 16, first: 32, held: minAhead},
			{p: 32, n: 4, first: 36, held: 2 * minAhead},
			{p: 36, n: 16, first: 52, held: 4 * minAhead},
		}},
		{"ahead stops at a present page", -1, []step{
			{p: 50, n: 1, first: 50, held: 1},
			{p: 51, n: 1, first: 52, held: 1, presentAhead: 53},
		}},
		{"ahead stops at the region's end", -1, []step{
			{p: pages - 3, n: 1, first: pages - 3, held: 1},
			{p: pages - 2, n: 1, first: pages - 1, held: 1},
		}},
		{"a bad page ahead fails only its own window", 63, []step{
			{p: 60, n: 1, first: 60, held: 1},
			{p: 61, n: 1, first: 61, held: 0},
			{p: 62, n: 1, held: 0},
			{p: 63, n: 1, wantErr: true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab, err := newPageTable(g.Store(), mr, 0, pages)
			if err != nil {
				t.Fatal(err)
			}
			if tc.bad >= 0 {
				tab.ids[tc.bad] = cas.Sum([]byte("not in the store"))
				tab.locs[tc.bad] = cas.Location{}
			}
			r := &region{pages: pages, tab: tab, present: make([]atomic.Uint64, (pages+63)/64)}
			s := &Server{store: g.Store()}
			ra := newReadahead(16)
			for i, st := range tc.steps {
				if st.presentAhead > 0 {
					r.markPresent(st.presentAhead, 1)
				}
				data, err := ra.window(s, r, st.p, st.n)
				if st.wantErr {
					if !errors.Is(err, errdefs.ErrNotFound) {
						t.Fatalf("step %d: window(%d, %d) = %v, want ErrNotFound", i, st.p, st.n, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("step %d: window(%d, %d): %v", i, st.p, st.n, err)
				}
				if !bytes.Equal(data, src[st.p*PageSize:(st.p+st.n)*PageSize]) {
					t.Fatalf("step %d: window(%d, %d) differs from the image", i, st.p, st.n)
				}
				ra.after(s, r, st.p, st.n)
				if ra.n != st.held || (st.held > 0 && ra.first != st.first) {
					t.Fatalf("step %d: window(%d, %d) holds %d pages from %d, want %d from %d", i, st.p, st.n, ra.n, ra.first, st.held, st.first)
				}
			}
		})
	}
}
