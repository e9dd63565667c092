package memstore

// readahead holds pages read from the store ahead of their faults, for the
// fault handler, while a thread walks memory in order. Once a fault's window
// has been copied in and the faults run in order (the window starts where
// the previous one ended, or on a page read ahead), the handler reads the
// missing pages after the window (one read of the store for many pages),
// checks them all against their chunk ids as every read does, and serves
// the next faults from them. The faulting thread does not wait for the
// pages read ahead, and only each fault's window is copied in, as without
// it: a page read ahead is filled when, and only if, it faults. A fault
// elsewhere starts over.
type readahead struct {
	buf   []byte
	r     *region // nil: nothing held
	first int     // the page of r at buf[0]
	n     int     // pages held from first
	last  *region // the region of the last window served
	next  int     // the page after it
	seq   bool    // the last window was in order
	ahead int     // pages to read ahead next time
	// frame is the buffer the pages of a compacted frame are filled
	// through (Server.fillFrame).
	frame []byte
}

// Pages read ahead: minAhead at first, doubling with each read in order up
// to maxAhead.
const (
	minAhead = 4
	maxAhead = 32
)

func newReadahead(faultAround int) *readahead {
	return &readahead{buf: make([]byte, max(faultAround, maxAhead)*PageSize), ahead: minAhead, frame: make([]byte, maxAhead*PageSize)}
}

// window returns the data of pages [p, p+n) of r (n at most the handler's
// fault-around), from the pages held or else read through s.
func (ra *readahead) window(s *Server, r *region, p, n int) ([]byte, error) {
	held := ra.r == r && p >= ra.first && p+n <= ra.first+ra.n
	ra.seq = held || (ra.last == r && p == ra.next)
	if !ra.seq {
		ra.ahead = minAhead
	}
	ra.last, ra.next = r, p+n
	if held {
		return ra.buf[(p-ra.first)*PageSize : (p-ra.first+n)*PageSize], nil
	}
	ra.r, ra.n = nil, 0
	if err := s.read(r, p, n, ra.buf); err != nil {
		return nil, err
	}
	ra.r, ra.first, ra.n = r, p, n
	return ra.buf[:n*PageSize], nil
}

// after reads ahead, once the window [p, p+n) of r has been copied in:
// when the window was in order and no page after it is held, the missing
// pages that follow it. A page that cannot be read is left for its own
// fault to report.
func (ra *readahead) after(s *Server, r *region, p, n int) {
	if !ra.seq || ra.r != r || ra.first+ra.n > p+n {
		return
	}
	from := p + n
	k := 0
	for k < ra.ahead && from+k < r.pages && !r.isPresent(from+k) {
		k++
	}
	if k == 0 {
		return
	}
	ra.r, ra.n = nil, 0
	if err := s.read(r, from, k, ra.buf); err != nil {
		return
	}
	ra.r, ra.first, ra.n = r, from, k
	ra.ahead = min(2*ra.ahead, maxAhead)
}
