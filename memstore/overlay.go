package memstore

import (
	"fmt"
	"io"
	"slices"
	"sync"
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
// Its memory is mapped outside the Go heap and counted: the creator holds
// one reference, each Server restoring from it another, and the memory
// goes when the last is released (to be reused by the next overlay, see
// spareMappings).
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
		data, err := spares.take(len(pages) * PageSize)
		if err != nil {
			return nil, err
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
		spares.give(o.data)
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

// spareMappings keeps a few released overlay mappings for the next
// overlays: a fresh mapping costs a page fault (and a page cleared) per
// page as it is filled, which for the pages of a fork is more than
// copying them.
type spareMappings struct {
	mu    sync.Mutex
	maps  [][]byte
	bytes int
}

// Bounds on the mappings kept.
const (
	maxSpareMappings = 4
	maxSpareBytes    = 256 << 20
)

var spares spareMappings

// take returns a mapping of size bytes: a kept one of at least size and
// at most twice it, or a new one (with transparent huge pages asked for).
func (s *spareMappings) take(size int) ([]byte, error) {
	s.mu.Lock()
	for i, m := range s.maps {
		if cap(m) >= size && cap(m) <= 2*size {
			s.maps = slices.Delete(s.maps, i, i+1)
			s.bytes -= cap(m)
			s.mu.Unlock()
			return m[:size], nil
		}
	}
	s.mu.Unlock()
	const huge = 2 << 20
	data, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mapping %d bytes for an overlay: %w", size, err)
	}
	if size >= huge {
		_ = unix.Madvise(data, unix.MADV_HUGEPAGE)
	}
	return data, nil
}

// give keeps m for a later take, or unmaps it when enough are kept.
func (s *spareMappings) give(m []byte) {
	m = m[:cap(m)]
	s.mu.Lock()
	if len(s.maps) < maxSpareMappings && s.bytes+len(m) <= maxSpareBytes {
		s.maps = append(s.maps, m)
		s.bytes += len(m)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	_ = unix.Munmap(m)
}
