package memstore

import (
	"bytes"
	"context"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
)

// overlayOf makes an overlay of the listed pages of img over base.
func overlayOf(t *testing.T, img []byte, pages []uint64, base *Overlay) *Overlay {
	t.Helper()
	o, err := NewOverlay(pages, base)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pages {
		copy(o.Data()[i*PageSize:], img[p*PageSize:(p+1)*PageSize])
	}
	return o
}

// TestOverlayRestore restores a snapshot through chains of overlays: every
// page comes from the newest overlay that holds it, else from the map; and
// capturing each overlay on its parent gives the same memory from the
// store alone.
func TestOverlayRestore(t *testing.T) {
	const pages = 512
	base := image(3, pages)
	mid := bytes.Clone(base)
	copy(mid[10*PageSize:], image(4, 40))            // pages 10..49
	copy(mid[300*PageSize:], make([]byte, PageSize)) // a page zeroed
	top := bytes.Clone(mid)
	copy(top[40*PageSize:], image(5, 20)) // pages 40..59, over mid's
	midPages := append(seq(10, 50), 300)
	topPages := seq(40, 60)

	for _, tc := range []struct {
		name   string
		chain  int // overlays: 1 mid, 2 mid and top
		want   []byte
		around int
	}{
		{"one overlay, one page per fault", 1, mid, 1},
		{"one overlay, fault-around", 1, mid, 16},
		{"two overlays, one page per fault", 2, top, 1},
		{"two overlays, fault-around", 2, top, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
			capture(t, g, base, CaptureOptions{Name: "base"})
			om := overlayOf(t, mid, midPages, nil)
			o := om
			if tc.chain == 2 {
				o = overlayOf(t, top, topPages, om)
			}
			region := anon(t, len(base))
			r := start(t, g, "base", region, Options{FaultAround: tc.around, Prefetch: []uint64{}, Overlay: o})
			touch(region, allPages(pages), 2)
			if !bytes.Equal(region, tc.want) {
				t.Fatal("restored memory differs from the overlaid image")
			}
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			// Written to the store, one overlay on the other.
			if _, err := Capture(ctx, g, om, int64(len(base)), CaptureOptions{Name: "mid", Parent: "base", Dirty: om.Bitmap(pages)}); err != nil {
				t.Fatal(err)
			}
			name := "mid"
			if tc.chain == 2 {
				if _, err := Capture(ctx, g, o, int64(len(base)), CaptureOptions{Name: "top", Parent: "mid", Dirty: o.Bitmap(pages)}); err != nil {
					t.Fatal(err)
				}
				name = "top"
				o.Release()
			}
			om.Release()
			region = anon(t, len(base))
			r = start(t, g, name, region, Options{Prefetch: []uint64{}})
			touch(region, allPages(pages), 1)
			if !bytes.Equal(region, tc.want) {
				t.Fatal("memory restored from the captured overlays differs")
			}
			_ = r.Close()
			if om.Data() != nil {
				t.Fatal("an overlay's memory outlived its last reference")
			}
		})
	}
}

func TestOverlayRefusesBadPages(t *testing.T) {
	for _, pages := range [][]uint64{{3, 2}, {1, 1}} {
		if _, err := NewOverlay(pages, nil); err == nil {
			t.Errorf("NewOverlay(%v) accepted", pages)
		}
	}
	o, err := NewOverlay([]uint64{2}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Release()
	if _, err := o.ReadAt(make([]byte, PageSize), 3*PageSize); err == nil {
		t.Error("ReadAt of a page the overlay lacks succeeded")
	}
}

// seq is [from, to).
func seq(from, to uint64) []uint64 {
	var out []uint64
	for p := from; p < to; p++ {
		out = append(out, p)
	}
	return out
}

// TestOverlayRun checks which windows are served straight from overlay
// memory: only those the overlay holds in full, back to back in one
// mapping.
func TestOverlayRun(t *testing.T) {
	const pages = 16
	img := image(6, pages)
	lower := overlayOf(t, img, seq(0, 8), nil)   // pages 0..7
	upper := overlayOf(t, img, seq(4, 6), lower) // pages 4..5 over lower's
	gap := overlayOf(t, img, []uint64{10, 12}, nil)
	defer func() {
		for _, o := range []*Overlay{upper, lower, gap} {
			o.Release()
		}
	}()
	for _, tc := range []struct {
		name string
		o    *Overlay
		p, n int
		want []uint64 // the pages served from memory, nil for none
	}{
		{"one page", lower, 3, 1, seq(3, 4)},
		{"a run in one mapping", lower, 0, 8, seq(0, 8)},
		{"past the overlay's end", lower, 6, 4, nil},
		{"a page the overlay lacks", lower, 9, 1, nil},
		{"across two mappings", upper, 2, 4, nil},
		{"inside the upper mapping", upper, 4, 2, seq(4, 6)},
		{"the lower mapping after the upper", upper, 6, 2, seq(6, 8)},
		{"pages apart in the overlay", gap, 10, 3, nil},
		{"one page of a sparse overlay", gap, 12, 1, seq(12, 13)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &region{pages: pages, over: overlaid(tc.o, span{pages: pages})}
			got := r.overlayRun(tc.p, tc.n)
			if tc.want == nil {
				if got != nil {
					t.Fatalf("overlayRun(%d, %d) = %d bytes, want nil", tc.p, tc.n, len(got))
				}
				return
			}
			var want []byte
			for _, p := range tc.want {
				want = append(want, img[p*PageSize:(p+1)*PageSize]...)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("overlayRun(%d, %d) does not hold pages %v", tc.p, tc.n, tc.want)
			}
		})
	}
}
