package memstore

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Options tune a restore.
type Options struct {
	// FaultAround is how many contiguous missing pages answer one fault
	// (default 16: 64 KiB). 1 serves exactly the faulting page, unless it
	// lies in a compacted zstd frame: then the frame's other pages near it
	// come too (frames.go).
	FaultAround int
	// Prefetch lists pages to populate first, in order (a working set).
	Prefetch []uint64
	// PrefetchBatch is how many prefetch pages go per batch (default 256).
	PrefetchBatch int
	// Tables, when set, keeps the page tables of the maps restored, for
	// the next restore of the same snapshot to take.
	Tables *Tables
	// Overlay, when set, holds pages served from host memory instead of
	// the map (a snapshot on its way to the store); the server holds a
	// reference to it until it shuts down.
	Overlay *Overlay
}

func (o *Options) defaults() {
	if o.FaultAround <= 0 {
		o.FaultAround = 16
	}
	if o.PrefetchBatch <= 0 {
		o.PrefetchBatch = 256
	}
}

// Stats counts what a restore did.
type Stats struct {
	Faults int64 `json:"faults"` // fault messages served
	// Repeats counts the fault messages for a page that was already
	// present: the prefetcher filled it after the fault was queued, or a
	// thread interrupted by a signal faulted on the page again before the
	// first message was answered. Faults-Repeats faults filled pages.
	Repeats    int64 `json:"repeats"`
	Copied     int64 `json:"copied"`     // pages filled with UFFDIO_COPY on a fault
	Zeroed     int64 `json:"zeroed"`     // pages filled with UFFDIO_ZEROPAGE on a fault
	Prefetched int64 `json:"prefetched"` // pages filled by the prefetcher
}

// totals counts the pages every restore of this process filled, on a
// fault and by prefetching.
var totals struct{ faulted, prefetched atomic.Int64 }

// Totals returns the pages every restore in this process has filled so
// far: on a fault (lazily, as the guest touched them) and by prefetching.
func Totals() (faulted, prefetched int64) {
	return totals.faulted.Load(), totals.prefetched.Load()
}

// pageTable is a memory map resolved once: page → chunk and location.
type pageTable struct {
	ids  []cas.ID
	locs []cas.Location
	// moves is the store's Moves before the locations were looked up: a
	// kept table is resolved again once it differs (Tables).
	moves uint64
}

func newPageTable(store *cas.Store, r *snapshotter.MapReader, offset uint64, pages int) (*pageTable, error) {
	t := &pageTable{ids: make([]cas.ID, pages), moves: store.Moves()}
	for i := range pages {
		t.ids[i] = r.Block(offset + uint64(i))
	}
	locs, err := store.LookupMany(t.ids)
	if err != nil {
		return nil, fmt.Errorf("memory map: %w", err)
	}
	t.locs = locs
	return t, nil
}

// Server serves the page faults of registered regions from a snapshot's
// memory map. It runs until shut down, or until a page cannot be served:
// then it records the error (Err) and makes the regions fail loudly rather
// than hand out a wrong page.
type Server struct {
	fd      *uffd.FD
	regions []*region
	store   *cas.Store
	opts    Options
	// onFail runs once when serving fails, before waiters are woken.
	onFail func()

	stop     int         // eventfd that ends the handler
	halt     atomic.Bool // set before stop is written
	wg       sync.WaitGroup
	stopOnce sync.Once

	errOnce sync.Once
	err     atomic.Pointer[error]
	failed  chan struct{}

	traceMu sync.Mutex
	trace   []uint64 // pages (of the map) served on faults, in order

	faults, repeats, copied, zeroed, prefetched atomic.Int64

	// prefetchDone is closed when the prefetcher has finished (at once
	// when there is nothing to prefetch).
	prefetchDone chan struct{}
}

// region is one registered range and the part of the map behind it.
type region struct {
	base    uintptr
	pages   int
	first   uint64 // the map page at base
	tab     *pageTable
	present []atomic.Uint64 // pages filled, bit per page
	// over holds, per page, its data in the overlay (nil: from the map);
	// nil without an overlay.
	over [][]byte
}

func (r *region) isPresent(p int) bool { return r.present[p/64].Load()&(1<<(p%64)) != 0 }

func (r *region) markPresent(first, n int) {
	for p := first; p < first+n; p++ {
		r.present[p/64].Or(1 << (p % 64))
	}
}

// span describes a registered range: its address, its pages, and the map
// page it starts at.
type span struct {
	base  uintptr
	pages int
	first uint64
}

// newServer resolves the page tables and starts the fault handler and, when
// there is a working set, the prefetcher.
func newServer(ctx context.Context, fd *uffd.FD, spans []span, g *snapshotter.Graph, snap, m string, r *snapshotter.MapReader, opts Options, onFail func()) (*Server, error) {
	store := g.Store()
	opts.defaults()
	s := &Server{fd: fd, store: store, opts: opts, onFail: onFail, failed: make(chan struct{}), prefetchDone: make(chan struct{})}
	for _, sp := range spans {
		if uint64(sp.pages)+sp.first > r.Blocks() {
			return nil, fmt.Errorf("region of %d pages at page %d is larger than the snapshot's %d pages: %w", sp.pages, sp.first, r.Blocks(), errdefs.ErrInvalidArgument)
		}
		var tab *pageTable
		var err error
		if opts.Tables != nil {
			if tab, err = opts.Tables.tableOf(g, snap, m, r); err == nil {
				tab = tab.slice(sp.first, sp.pages)
			}
		} else {
			tab, err = newPageTable(store, r, sp.first, sp.pages)
		}
		if err != nil {
			return nil, err
		}
		s.regions = append(s.regions, &region{base: sp.base, pages: sp.pages, first: sp.first, tab: tab, present: make([]atomic.Uint64, (sp.pages+63)/64), over: overlaid(opts.Overlay, sp)})
	}
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	s.stop = stop
	if opts.Overlay != nil {
		opts.Overlay.Retain()
	}
	s.wg.Add(1)
	go s.handle()
	s.wg.Add(1)
	go s.prefetch(ctx, opts.Prefetch)
	return s, nil
}

// Err returns the error that ended serving, or nil.
func (s *Server) Err() error {
	if e := s.err.Load(); e != nil {
		return *e
	}
	return nil
}

// PrefetchDone is closed once the working set is populated (or prefetching
// stopped early).
func (s *Server) PrefetchDone() <-chan struct{} { return s.prefetchDone }

// Failed is closed when serving fails.
func (s *Server) Failed() <-chan struct{} { return s.failed }

// Stats returns the counts so far.
func (s *Server) Stats() Stats {
	return Stats{Faults: s.faults.Load(), Repeats: s.repeats.Load(), Copied: s.copied.Load(), Zeroed: s.zeroed.Load(), Prefetched: s.prefetched.Load()}
}

// WorkingSet returns the map pages served on faults so far, in the order of
// the faults: each fault's window, the faulting page first.
func (s *Server) WorkingSet() []uint64 {
	s.traceMu.Lock()
	defer s.traceMu.Unlock()
	return slices.Clone(s.trace)
}

func (s *Server) fail(err error) {
	s.errOnce.Do(func() {
		s.err.Store(&err)
		if s.onFail != nil {
			s.onFail()
		}
		// Wake every waiter: with the memory made inaccessible they fault
		// again and see an error instead of sleeping forever.
		for _, r := range s.regions {
			_ = s.fd.Wake(r.base, uintptr(r.pages)*PageSize)
		}
		close(s.failed)
	})
}

// Shutdown stops the handler and prefetcher and waits for them.
// It may be called more than once.
func (s *Server) Shutdown() {
	s.stopOnce.Do(func() {
		s.halt.Store(true)
		var one [8]byte
		one[0] = 1
		_, _ = unix.Write(s.stop, one[:])
		s.wg.Wait()
		unix.Close(s.stop)
		if s.opts.Overlay != nil {
			s.opts.Overlay.Release()
		}
	})
}

// handle is the fault loop. It runs on its own OS thread, so that a
// goroutine blocked in a fault on another thread never waits for it to be
// scheduled.
func (s *Server) handle() {
	defer s.wg.Done()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	msgs := make([]uffd.Msg, 64)
	faults := make([]uffd.Fault, 0, len(msgs))
	ra := newReadahead(s.opts.FaultAround)
	fds := []unix.PollFd{{Fd: int32(s.fd.Fd()), Events: unix.POLLIN}, {Fd: int32(s.stop), Events: unix.POLLIN}}
	for !s.halt.Load() {
		// Read first and poll only when nothing is pending: while a
		// thread walks memory, its next fault is usually queued by the
		// time the previous one is answered, and a poll would cost a
		// system call per fault.
		faults, err := s.fd.ReadFaults(msgs, faults[:0])
		if errors.Is(err, unix.EAGAIN) {
			if !s.wait(fds) {
				return
			}
			continue
		}
		if err != nil {
			s.fail(fmt.Errorf("reading faults: %w", err))
			return
		}
		for _, f := range faults {
			if err := s.serve(f.Address, ra); err != nil {
				s.fail(err)
				return
			}
		}
	}
}

// wait blocks until the userfaultfd has events, and reports false when
// the handler should end instead (shut down, or the descriptor failed).
func (s *Server) wait(fds []unix.PollFd) bool {
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		_, err := unix.Poll(fds, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		switch {
		case err != nil:
			s.fail(fmt.Errorf("polling userfaultfd: %w", err))
			return false
		case fds[1].Revents != 0:
			return false
		case fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0:
			s.fail(errors.New("userfaultfd closed under the handler"))
			return false
		}
		return true
	}
}

// regionOf returns the region holding addr and the page within it.
func (s *Server) regionOf(addr uintptr) (*region, int) {
	for _, r := range s.regions {
		if addr >= r.base && addr < r.base+uintptr(r.pages)*PageSize {
			return r, int((addr - r.base) / PageSize)
		}
	}
	return nil, 0
}

// serve answers one fault with a window of missing pages starting at the
// faulting page, reading through ra.
func (s *Server) serve(addr uintptr, ra *readahead) error {
	r, p := s.regionOf(addr)
	if r == nil {
		return fmt.Errorf("fault at %#x outside every registered region", addr)
	}
	s.faults.Add(1)
	if r.isPresent(p) {
		// Filled after the fault was queued (by the prefetcher, or for an
		// earlier message from a thread that a signal made fault again);
		// that copy woke the thread already, but make sure.
		s.repeats.Add(1)
		s.record(r, p, 1)
		return s.fd.Wake(r.base+uintptr(p)*PageSize, PageSize)
	}
	n := 1
	for n < s.opts.FaultAround && p+n < r.pages && !r.isPresent(p+n) {
		n++
	}
	// The whole window goes into the working set: the pages after the
	// faulting one are there because the guest was expected to need them,
	// and recording only the faulting page would leave a prefetched
	// restore to fault on all the others.
	s.record(r, p, n)
	if r.allZero(p, n) {
		return s.zero(r, p, n, &s.zeroed, &totals.faulted)
	}
	if data := r.overlayRun(p, n); data != nil {
		return s.copyIn(r, p, n, data, &s.copied, &totals.faulted)
	}
	data, err := ra.window(s, r, p, n)
	if err != nil {
		return err
	}
	if err := s.copyIn(r, p, n, data, &s.copied, &totals.faulted); err != nil {
		return err
	}
	if r.inFrame(p, r.tab.locs[p]) {
		// The frame is decoded: bring in its other pages near p
		// (frames.go), which also covers what reading ahead would.
		s.fillFrame(r, p, ra.frame)
		return nil
	}
	ra.after(s, r, p, n)
	return nil
}

// record appends pages [p, p+n) of r to the working set.
func (s *Server) record(r *region, p, n int) {
	s.traceMu.Lock()
	for i := range n {
		s.trace = append(s.trace, r.first+uint64(p+i))
	}
	s.traceMu.Unlock()
}

// fill populates pages [p, p+n) of r from its table, counting them in
// copied or zeroed, and in total.
func (s *Server) fill(r *region, p, n int, buf []byte, copied, zeroed, total *atomic.Int64) error {
	if r.allZero(p, n) {
		return s.zero(r, p, n, zeroed, total)
	}
	if data := r.overlayRun(p, n); data != nil {
		// Straight from the overlay's memory, which the server holds a
		// reference to: no copy into buf first.
		return s.copyIn(r, p, n, data, copied, total)
	}
	if err := s.read(r, p, n, buf); err != nil {
		return err
	}
	return s.copyIn(r, p, n, buf[:n*PageSize], copied, total)
}

// allZero reports whether pages [p, p+n) of r are all zero pages.
func (r *region) allZero(p, n int) bool {
	for i := p; i < p+n; i++ {
		if r.tab.ids[i] != cas.ZeroID || (r.over != nil && r.over[i] != nil) {
			return false
		}
	}
	return true
}

// overlayRun returns the memory of pages [p, p+n) of r when the overlay
// holds all of them, back to back in one mapping, else nil.
func (r *region) overlayRun(p, n int) []byte {
	if r.over == nil || r.over[p] == nil || cap(r.over[p]) < n*PageSize {
		return nil
	}
	first := uffd.Addr(r.over[p])
	for i := 1; i < n; i++ {
		if r.over[p+i] == nil || uffd.Addr(r.over[p+i]) != first+uintptr(i)*PageSize {
			return nil
		}
	}
	return r.over[p][:n*PageSize]
}

// zero maps the zero page into pages [p, p+n) of r.
func (s *Server) zero(r *region, p, n int, zeroed, total *atomic.Int64) error {
	done, err := s.fd.ZeroPage(r.base+uintptr(p)*PageSize, uintptr(n)*PageSize)
	if err != nil {
		return err
	}
	r.markPresent(p, n)
	zeroed.Add(int64(done / PageSize))
	total.Add(int64(done / PageSize))
	return nil
}

// copyIn copies data into pages [p, p+n) of r.
func (s *Server) copyIn(r *region, p, n int, data []byte, copied, total *atomic.Int64) error {
	done, err := s.fd.Copy(r.base+uintptr(p)*PageSize, uffd.Addr(data), uintptr(n)*PageSize)
	if err != nil {
		return err
	}
	r.markPresent(p, n)
	copied.Add(int64(done / PageSize))
	total.Add(int64(done / PageSize))
	return nil
}

// read reads pages [p, p+n) of r into buf: from the overlay where it holds
// them, else from the store.
func (s *Server) read(r *region, p, n int, buf []byte) error {
	for i := 0; i < n; {
		if r.over != nil && r.over[p+i] != nil {
			copy(buf[i*PageSize:(i+1)*PageSize], r.over[p+i])
			i++
			continue
		}
		j := i + 1
		for j < n && (r.over == nil || r.over[p+j] == nil) {
			j++
		}
		if err := s.store.GetLocated(r.tab.ids[p+i:p+j], r.tab.locs[p+i:p+j], buf[i*PageSize:j*PageSize]); err != nil {
			// A table kept from an earlier restore (Tables) may name a
			// pack GC has removed since: look the chunks up again.
			if err := s.store.GetMany(r.tab.ids[p+i:p+j], buf[i*PageSize:j*PageSize]); err != nil {
				return fmt.Errorf("restoring page %d: %w", r.first+uint64(p+i), err)
			}
		}
		i = j
	}
	return nil
}

// overlaid returns, for each page of sp, its data in o or its bases (nil
// where they lack it), or nil when o is nil.
func overlaid(o *Overlay, sp span) [][]byte {
	if o == nil {
		return nil
	}
	var chain []*Overlay
	for x := o; x != nil; x = x.base {
		chain = append(chain, x)
	}
	over := make([][]byte, sp.pages)
	// Oldest first, so that a newer overlay's page wins.
	for k := len(chain) - 1; k >= 0; k-- {
		x := chain[k]
		for i, mp := range x.pages {
			if mp >= sp.first && mp < sp.first+uint64(sp.pages) {
				over[mp-sp.first] = x.data[i*PageSize : (i+1)*PageSize]
			}
		}
	}
	return over
}

// prefetch populates the working set (map pages) in batches, with
// prefetchWorkers goroutines taking turns: each sorts its batch and fills it
// as runs of contiguous missing pages.
func (s *Server) prefetch(ctx context.Context, pages []uint64) {
	defer s.wg.Done()
	defer close(s.prefetchDone)
	var wg sync.WaitGroup
	for w := range prefetchWorkers {
		wg.Go(func() {
			const maxRun = 64
			buf := make([]byte, maxRun*PageSize)
			batch := make([]uint64, 0, s.opts.PrefetchBatch)
			for first := w * s.opts.PrefetchBatch; first < len(pages); first += prefetchWorkers * s.opts.PrefetchBatch {
				if ctx.Err() != nil || s.Err() != nil || s.stopped() {
					return
				}
				batch = append(batch[:0], pages[first:min(len(pages), first+s.opts.PrefetchBatch)]...)
				slices.Sort(batch)
				batch = slices.Compact(batch)
				for i := 0; i < len(batch); {
					r, p := s.regionOfPage(batch[i])
					if r == nil || r.isPresent(p) {
						i++
						continue
					}
					n := 1
					for i+n < len(batch) && n < maxRun && p+n < r.pages && batch[i+n] == batch[i]+uint64(n) && !r.isPresent(p+n) {
						n++
					}
					if err := s.fill(r, p, n, buf, &s.prefetched, &s.prefetched, &totals.prefetched); err != nil {
						s.fail(err)
						return
					}
					i += n
				}
			}
		})
	}
	wg.Wait()
}

// prefetchWorkers is how many goroutines populate a working set.
const prefetchWorkers = 2

// regionOfPage returns the region holding map page mp and the page within it.
func (s *Server) regionOfPage(mp uint64) (*region, int) {
	for _, r := range s.regions {
		if mp >= r.first && mp < r.first+uint64(r.pages) {
			return r, int(mp - r.first)
		}
	}
	return nil, 0
}

// stopped reports whether shutdown has begun.
func (s *Server) stopped() bool { return s.halt.Load() }
