package memstore

// readahead holds pages read from the store ahead of their faults, for the
// fault handler, while a thread walks memory in order. When a fault's window
// starts where the previous one ended, the handler reads the window and the
// missing pages after it together (one read of the store for many pages),
// checks them all against their chunk ids as every read does, and serves
// the next faults from what it holds. Only each fault's window is copied
// in, as without it: a page read ahead is filled when, and only if, it
// faults. A fault elsewhere starts over with no pages ahead.
type readahead struct {
	buf   []byte
	r     *region // nil: nothing held
	first int     // the page of r at buf[0]
	n     int     // pages held from first
	next  int     // the page after the last window served; -1 for none
	ahead int     // pages to read past the next window read in sequence
}

// Pages read past a window in sequence: minAhead at first, doubling with
// each read in sequence up to maxAhead.
const (
	minAhead = 4
	maxAhead = 32
)

func newReadahead(faultAround int) *readahead {
	return &readahead{buf: make([]byte, (faultAround+maxAhead)*PageSize), next: -1, ahead: minAhead}
}

// window returns the data of pages [p, p+n) of r (n at most the handler's
// fault-around), from the pages held or else read through s.
func (ra *readahead) window(s *Server, r *region, p, n int) ([]byte, error) {
	if ra.r == r && p >= ra.first && p+n <= ra.first+ra.n {
		ra.next = p + n
		return ra.buf[(p-ra.first)*PageSize : (p-ra.first+n)*PageSize], nil
	}
	m := n
	if ra.r == r && p == ra.next {
		for m < n+ra.ahead && p+m < r.pages && !r.isPresent(p+m) {
			m++
		}
		ra.ahead = min(2*ra.ahead, maxAhead)
	} else {
		ra.ahead = minAhead
	}
	ra.r, ra.n = nil, 0
	if err := s.read(r, p, m, ra.buf); err != nil {
		if m == n {
			return nil, err
		}
		// A page ahead that cannot be read fails the restore only if it
		// faults: read the window alone.
		m = n
		if err := s.read(r, p, n, ra.buf); err != nil {
			return nil, err
		}
	}
	ra.r, ra.first, ra.n, ra.next = r, p, m, p+n
	return ra.buf[:n*PageSize], nil
}
