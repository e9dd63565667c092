package memstore

import "github.com/boxd-dev/boxd/cas"

// A compacted store keeps chunks in zstd frames of up to 255 (cas), and
// reading one chunk of a frame decodes the whole frame, about a millisecond
// for a full one. A fault on such a page is therefore served with its frame:
// once the faulting window is in, every missing page within frameReach of it
// whose chunk lies in the same frame is filled too, from the frame the store
// just decoded (it keeps the last few), so that the guest's later faults
// near it do not decode the frame again, or happen at all. Without this, a
// guest touching a compacted snapshot's memory in no particular order paid
// a frame's decoding on nearly every fault.

// frameReach bounds how far from the faulting page the pages of its frame
// are looked for: a frame holds at most cas.MaxFrameChunks chunks, which a
// memory capture wrote in the order of its pages.
const frameReach = cas.MaxFrameChunks

// inFrame reports whether page p of r is served from the store (not zero,
// not from the overlay) out of the zstd frame that loc names.
func (r *region) inFrame(p int, loc cas.Location) bool {
	return r.tab.ids[p] != cas.ZeroID && (r.over == nil || r.over[p] == nil) && r.tab.locs[p].SameFrame(loc)
}

// fillFrame fills the missing pages of r within frameReach of page p whose
// chunks lie in p's frame, in runs read through buf (which holds at least
// one page). They count as filled on a fault. A run that cannot be read is
// left for its own faults to report: the faulting page is in already.
func (s *Server) fillFrame(r *region, p int, buf []byte) {
	loc := r.tab.locs[p]
	most := len(buf) / PageSize
	for q, end := max(0, p-frameReach), min(r.pages, p+frameReach+1); q < end; {
		if r.isPresent(q) || !r.inFrame(q, loc) {
			q++
			continue
		}
		n := 1
		for n < most && q+n < end && !r.isPresent(q+n) && r.inFrame(q+n, loc) {
			n++
		}
		if s.read(r, q, n, buf) != nil || s.copyIn(r, q, n, buf[:n*PageSize], &s.copied, &totals.faulted) != nil {
			return
		}
		q += n
	}
}
