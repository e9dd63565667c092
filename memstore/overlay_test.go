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
