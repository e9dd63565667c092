package memstore

import "math/bits"

// Bitmap marks pages, bit n of word n/64 for page n: the layout of KVM's
// dirty log (KVM_GET_DIRTY_LOG) on little-endian hosts.
type Bitmap []uint64

// NewBitmap returns an empty bitmap for pages pages.
func NewBitmap(pages int) Bitmap { return make(Bitmap, (pages+63)/64) }

// Set marks page n.
func (b Bitmap) Set(n int) { b[n/64] |= 1 << (n % 64) }

// Has reports whether page n is marked.
func (b Bitmap) Has(n int) bool { return n/64 < len(b) && b[n/64]&(1<<(n%64)) != 0 }

// Count returns the number of marked pages.
func (b Bitmap) Count() int {
	n := 0
	for _, w := range b {
		n += bits.OnesCount64(w)
	}
	return n
}

// Pages returns the marked pages below limit, in order.
func (b Bitmap) Pages(limit int) []uint64 {
	out := make([]uint64, 0, b.Count())
	for i, w := range b {
		for w != 0 {
			n := i*64 + bits.TrailingZeros64(w)
			if n >= limit {
				return out
			}
			out = append(out, uint64(n))
			w &= w - 1
		}
	}
	return out
}
