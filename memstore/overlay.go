package memstore

import (
	"fmt"
	"io"
	"slices"
	"sync/atomic"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Overlay holds pages of a memory map in host memory, for restores to serve
// before the store: the pages a snapshot changed, while that snapshot is on
// its way to the store. An overlay stands on a base overlay (its parent
// snapshot's, also on its way) or on a map in the store; a page it lacks is
// looked for in the base, then in the map.
//
// Its memory is mapped outside the Go heap (with transparent huge pages
// asked for, so that filling it costs few page faults) and counted: the
// creator holds one reference, each Server restoring from it another, and
// the memory is unmapped when the last is released.
type Overlay struct {
	base  *Overlay
	pages []uint64 // map pages, ascending; page pages[i] is data[i*PageSize:]
	data  []byte
	refs  atomic.Int64
}

// NewOverlay maps memory for pages (map page numbers, ascending, no
// repeats) over base (nil for none), holding a reference to base. The
// caller fills Data and holds the one reference the overlay starts with.
func NewOverlay(pages []uint64, base *Overlay) (*Overlay, error) {
	if !slices.IsSorted(pages) || len(slices.Compact(slices.Clone(pages))) != len(pages) {
		return nil, fmt.Errorf("overlay pages must ascend without repeats: %w", errdefs.ErrInvalidArgument)
	}
	o := &Overlay{base: base, pages: pages}
	if len(pages) > 0 {
		const huge = 2 << 20
		size := len(pages) * PageSize
		data, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			return nil, fmt.Errorf("mapping %d bytes for an overlay: %w", size, err)
		}
		if size >= huge {
			_ = unix.Madvise(data, unix.MADV_HUGEPAGE)
		}
		o.data = data
	}
	o.refs.Store(1)
	if base != nil {
		base.Retain()
	}
	return o, nil
}

// Data is the overlay's memory: page Pages()[i] at i*PageSize.
func (o *Overlay) Data() []byte { return o.data }

// Pages lists the map pages the overlay itself holds, ascending.
func (o *Overlay) Pages() []uint64 { return o.pages }

// Base is the overlay this one stands on, or nil.
func (o *Overlay) Base() *Overlay { return o.base }

// Retain adds a reference.
func (o *Overlay) Retain() { o.refs.Add(1) }

// Release drops a reference; the last one unmaps the memory and releases
// the base.
func (o *Overlay) Release() {
	n := o.refs.Add(-1)
	if n > 0 {
		return
	}
	if n < 0 {
		panic("memstore: overlay released more often than retained")
	}
	if o.data != nil {
		_ = unix.Munmap(o.data)
		o.data = nil
	}
	if o.base != nil {
		o.base.Release()
	}
}

// Bitmap marks the pages the overlay itself holds, in a map of pages pages:
// the dirty bitmap to capture it with.
func (o *Overlay) Bitmap(pages int) Bitmap {
	b := NewBitmap(pages)
	for _, p := range o.pages {
		if p < uint64(pages) {
			b.Set(int(p))
		}
	}
	return b
}

// ReadAt reads the overlay's own pages as a memory map would hold them, for
// Capture with Bitmap: a page the overlay does not hold is an error.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		pg, in := uint64(off+int64(n))/PageSize, int(off+int64(n))%PageSize
		i, ok := slices.BinarySearch(o.pages, pg)
		if !ok {
			return n, fmt.Errorf("page %d is not in the overlay: %w", pg, io.ErrUnexpectedEOF)
		}
		n += copy(p[n:], o.data[i*PageSize+in:(i+1)*PageSize])
	}
	return n, nil
}
