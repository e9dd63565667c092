package qemu

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
)

// A lazy restore starts QEMU with an empty memory file and serves guest
// RAM from the snapshot in the store while the guest runs, as the source
// of a QEMU postcopy migration: QEMU registers its RAM with userfaultfd
// and asks boxd, over the migration's return path, for each page it
// faults on. boxd answers those first, pushes the snapshot's recorded
// working set ahead of demand, then the rest of the pages that hold data,
// then ends the migration: from there the machine no longer needs boxd
// for its memory, and pages never sent (zeros in the snapshot) are the
// kernel's zero pages. Once QEMU has registered its RAM, boxd takes its
// userfaultfd and places pages straight into guest RAM (directRAM)
// instead of writing them into the stream; where it cannot, the push of
// the rest waits for a grace and for quiet spells of the guest's requests,
// so that pages asked for do not queue behind it in the stream.
const (
	// lazyWindow is how many pages a demanded page brings along: the
	// pages that follow it and hold data, not yet sent. They go out after
	// the demanded page, in a part of their own, and after the requests
	// waiting by then: the guest waits only for the page it asked for.
	lazyWindow = 16
	// lazyBatch is how many pages the background push sends between
	// looks at QEMU's requests.
	lazyBatch = 32
	// directBatch is lazyBatch where the push places pages straight into
	// guest RAM (directRAM) while the guest runs: a request waits for the
	// batch being placed, which nothing in the stream bounds.
	directBatch = 8
	// lazyGrace is how long after the guest starts the pages outside
	// the working set wait, so that the guest's first faults are answered
	// without the whole memory in front of them in the stream, and are
	// recorded. Pages placed straight into guest RAM (directRAM) do not
	// wait unless Runner.LazyGrace says so.
	lazyGrace = 500 * time.Millisecond
	// lazyQuiet is how long after the guest's last page request the
	// push of the rest waits: while the guest faults, its pages go out
	// alone, since each page behind a batch in the stream waits for QEMU
	// to place the batch first.
	lazyQuiet = 10 * time.Millisecond
	// lazyQuietBudget bounds the time the push of the rest waits for
	// quiet, all waits together: a guest that never stops faulting must
	// not keep its memory from being all in place (and the box dependent
	// on boxd) for long.
	lazyQuietBudget = time.Second
	// lazyTraceWindow is how long after the guest starts demanded pages
	// count as its working set.
	lazyTraceWindow = 5 * time.Second
	// maxWorkingSet bounds a recorded working set (pages).
	maxWorkingSet = 1 << 18
)

// LazyStats counts what a lazy restore sent.
type LazyStats struct {
	Demanded   int64 `json:"demanded"`   // page requests QEMU made
	Prefetched int64 `json:"prefetched"` // working-set pages pushed
	Pushed     int64 `json:"pushed"`     // other pages pushed
	Framed     int64 `json:"framed"`     // pages sent after a demanded one of their zstd frame (queueFrame)
	Zeroed     int64 `json:"zeroed"`     // zero pages sent on demand
	Placed     int64 `json:"placed"`     // pages that hold data placed straight into guest RAM (directRAM), asked for or pushed
	Done       bool  `json:"done"`       // all memory is in place
}

// lazyCounters are LazyStats as they grow.
type lazyCounters struct {
	demanded, prefetched, pushed, framed, zeroed, placed atomic.Int64
}

// lazyMemory serves one restoring machine's guest RAM from a snapshot.
type lazyMemory struct {
	m     *Machine
	snap  string
	store *cas.Store
	plan  *postcopyPlan
	ids   []cas.ID // the snapshot's memory map: page → chunk
	ws    []uint64 // the working set to push first, sorted
	grace time.Duration
	quiet time.Duration // lazyQuiet
	// quietBudget is lazyQuietBudget.
	quietBudget time.Duration

	conn net.Conn
	pw   *postcopyWriter
	// direct places the pushed pages into guest RAM without the stream,
	// once taken from QEMU (directram.go); nil until then, or for good
	// where it cannot be. directMu orders its hand-over with the
	// writer's end (directEnded).
	direct      atomic.Pointer[directRAM]
	directMu    sync.Mutex
	directEnded bool
	reqs        chan rpMessage // page requests, reader → writer
	ran         chan struct{}  // closed when the guest may run (the writer starts its grace)

	sent memstore.Bitmap // pages written out or placed (writer only)
	// frameOf lists demanded pages whose frames' other pages go out after
	// the requests waiting, and framed the pages of the frame going out
	// now (queueFrame; writer only).
	frameOf, framed []int
	// windows holds the pages that follow demanded ones (lazyWindow), to
	// go out after the requests waiting (writer only).
	windows []int
	sums    *pageSums // page sums as sent, the machine's once done

	traceMu  sync.Mutex
	trace    []uint64 // pages demanded in the trace window
	traceEnd time.Time

	stats lazyCounters
	began time.Time // when serving started

	ended     atomic.Bool   // the stream's end was written
	done      chan struct{} // closed when the restore ended, err set
	err       error
	failOnce  sync.Once
	stopped   chan struct{} // closed by stop
	stopOnce  sync.Once
	hurry     chan struct{} // closed when the rest must come now (hurryUp)
	hurryOnce sync.Once
}

// lazyPageTable is a snapshot's memory as a lazy restore serves it.
type lazyPageTable struct {
	ids []cas.ID // page → chunk, cas.ZeroID for a page of zeros
	ws  []uint64 // the working set to push first, sorted, pages holding data
}

// lazyPages reads the memory map of snapshot snap, of a machine of size
// bytes, and its working set. A restore reads them while its machine is
// readied (a few ms for 512 MiB).
func (r *Runner) lazyPages(snap string, size int64) (lazyPageTable, error) {
	mr, err := r.Graph.OpenMap(snap, memstore.DefaultMap)
	if err != nil {
		return lazyPageTable{}, fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
	}
	pages := int(size / memstore.PageSize)
	if mr.Size() != size {
		return lazyPageTable{}, fmt.Errorf("qemu: memory of snapshot %q is %d bytes, its machine %d", snap, mr.Size(), size)
	}
	pt := lazyPageTable{ids: make([]cas.ID, pages)}
	for i := range pt.ids {
		pt.ids[i] = cas.ZeroID // pages the map leaves out hold zeros
	}
	if err := mr.Each(func(n uint64, id cas.ID) error {
		if n < uint64(pages) {
			pt.ids[n] = id
		}
		return nil
	}); err != nil {
		return lazyPageTable{}, fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
	}
	if ws, _, err := r.Graph.WorkingSet(snap, memstore.DefaultMap); err == nil {
		for _, p := range ws {
			if p < uint64(pages) && pt.ids[p] != cas.ZeroID {
				pt.ws = append(pt.ws, p)
			}
		}
		slices.Sort(pt.ws)
		pt.ws = slices.Compact(pt.ws)
	}
	return pt, nil
}

// lazyMemoryOf prepares serving pt, snapshot snap's memory, to m.
func (r *Runner) lazyMemoryOf(m *Machine, snap string, plan *postcopyPlan, pt lazyPageTable) *lazyMemory {
	pages := len(pt.ids)
	return &lazyMemory{
		m: m, snap: snap, store: r.Graph.Store(), plan: plan,
		ids:         pt.ids,
		ws:          pt.ws,
		grace:       r.LazyGrace,
		quiet:       lazyQuiet,
		quietBudget: lazyQuietBudget,
		reqs:        make(chan rpMessage, 4096),
		ran:         make(chan struct{}),
		sent:        memstore.NewBitmap(pages),
		sums:        newPageSums(pages),
		done:        make(chan struct{}),
		stopped:     make(chan struct{}),
		hurry:       make(chan struct{}),
	}
}

// start connects to QEMU's incoming socket, writes everything up to the
// pages and starts serving them.
func (l *lazyMemory) start(ctx context.Context, sock string, ph *phases) error {
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", sock); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qemu: %s: restoring memory: %w", l.m.id, err)
		case <-l.m.done:
			return l.m.exit
		case <-time.After(time.Millisecond):
		}
	}
	l.conn = conn
	l.began = time.Now()
	ph.mark("connect")
	l.pw = &postcopyWriter{w: bufio.NewWriterSize(conn, 1<<18)}
	err = l.pw.prelude(l.plan)
	if err == nil {
		ph.mark("prelude")
		err = l.early()
	}
	if err == nil {
		ph.mark("early")
		err = l.pw.pack(l.plan, earlyPages*memstore.PageSize) // not sent yet
	}
	if err != nil {
		_ = conn.Close()
		select { // QEMU gave up on the stream: say why
		case <-l.m.done:
		case <-time.After(time.Second):
		}
		return fmt.Errorf("qemu: %s: restoring memory: %w; QEMU said: %s", l.m.id, err, l.m.said())
	}
	ph.mark("package")
	go l.read()
	go l.write()
	go func() {
		select {
		case <-l.m.done:
			l.fail(fmt.Errorf("QEMU exited: %w", l.m.exit))
		case <-l.done:
		}
	}()
	return nil
}

// earlyPages is how much of guest RAM, from its start, goes before the
// devices: the legacy area below 1 MiB, where loading the devices reads
// guest memory (the TPR patching of kvmvapic).
const earlyPages = (1 << 20) / memstore.PageSize

// early sends the first earlyPages, which QEMU loads as precopy pages
// before it registers guest RAM: those of zeros too, which QEMU would
// otherwise ask for one by one as it loads the devices (kvmvapic reads
// its option ROM's area).
func (l *lazyMemory) early() error {
	buf := make([]byte, lazyBatch*memstore.PageSize)
	var batch []int
	all := map[int]bool{} // a page of zeros goes out as one only when asked for
	for p := 0; p < earlyPages && p < len(l.ids); p++ {
		batch = append(batch, p)
		all[p] = true
		if len(batch) == lazyBatch || p == earlyPages-1 || p == len(l.ids)-1 {
			if err := l.send(batch, all, buf); err != nil {
				return err
			}
			batch = batch[:0]
		}
	}
	return nil
}

// guestRuns tells the server the guest was let run: the trace window and
// the grace before the rest of the memory start.
func (l *lazyMemory) guestRuns() {
	l.traceMu.Lock()
	l.traceEnd = time.Now().Add(lazyTraceWindow)
	l.traceMu.Unlock()
	select {
	case <-l.ran:
	default:
		close(l.ran)
	}
}

// read takes QEMU's messages off the return path.
func (l *lazyMemory) read() {
	r := bufio.NewReader(l.conn)
	block := ""
	for {
		msg, err := readRPMessage(r)
		if err != nil {
			if !l.ended.Load() || !errors.Is(err, io.EOF) {
				l.fail(fmt.Errorf("the migration's return path: %w; QEMU said: %s", err, l.m.said()))
			}
			return
		}
		switch msg.typ {
		case rpShut:
			if msg.status != 0 {
				l.fail(fmt.Errorf("QEMU ended the migration with status %d; QEMU said: %s", msg.status, l.m.said()))
			}
			return
		case rpReqPagesID:
			block = msg.block
		case rpReqPages:
			msg.block = block
		default:
			continue
		}
		if msg.typ == rpReqPagesID || msg.typ == rpReqPages {
			if l.ended.Load() {
				continue // a fault raced the end: QEMU's end wakes it
			}
			select {
			case l.reqs <- msg:
			case <-l.done:
				return
			}
		}
	}
}

// write sends pages: requested ones first, then the working set, then,
// after the grace, the rest that hold data; then the end.
func (l *lazyMemory) write() {
	bufPages := max(lazyBatch, lazyWindow)
	buf := make([]byte, bufPages*memstore.PageSize)
	order := l.ws
	next := 0 // position in order
	rest := 0 // next page of the whole memory to consider
	var grace <-chan time.Time
	ran := l.ran // nil once seen
	graceOver := false
	defer l.dropDirect()
	pending := func() (rpMessage, bool) {
		select {
		case msg := <-l.reqs:
			return msg, true
		default:
			return rpMessage{}, false
		}
	}
	var lastDemand time.Time
	var held time.Duration // waits for quiet so far
	// answer serves a request; false once the restore has failed.
	answer := func(msg rpMessage) bool {
		if err := l.serve(msg, buf); err != nil {
			l.fail(err)
			return false
		}
		lastDemand = time.Now()
		return true
	}
	for {
		if msg, ok := pending(); ok {
			if !answer(msg) {
				return
			}
			continue
		}
		// The pages after demanded ones, then those of demanded pages'
		// frames, decoded lately (the store keeps the last few frames it
		// decoded).
		batch := l.nextWindow(make([]int, 0, lazyBatch))
		if len(batch) > 0 {
			if err := l.deliver(batch, nil, buf); err != nil {
				l.fail(err)
				return
			}
			continue
		}
		batch = l.nextFramed(batch)
		if len(batch) > 0 {
			if err := l.deliver(batch, nil, buf); err != nil {
				l.fail(err)
				return
			}
			l.stats.framed.Add(int64(len(batch)))
			continue
		}
		// The next background batch: the working set once the guest runs
		// (QEMU loads the devices without a push in its way), then the rest.
		direct := l.direct.Load()
		limit := lazyBatch
		if direct != nil {
			limit = directBatch
		}
		for ran == nil && next < len(order) && len(batch) < limit {
			if p := int(order[next]); !l.sent.Has(p) {
				batch = append(batch, p)
			}
			next++
		}
		inWS := len(batch) > 0
		if !inWS && !graceOver && ran == nil && direct != nil && l.grace == 0 {
			// Pages placed straight into guest RAM wait in no stream
			// in front of the guest's requests: no grace.
			graceOver = true
		}
		if !inWS && !graceOver {
			select {
			case msg := <-l.reqs:
				if !answer(msg) {
					return
				}
			case <-grace:
				graceOver = true
			case <-l.hurry:
				graceOver = true
			case <-ran:
				ran, grace = nil, time.After(cmp.Or(l.grace, lazyGrace))
			case <-l.done:
				return
			case <-l.stopped:
				return
			}
			continue
		}
		if wait := min(l.quiet-time.Since(lastDemand), l.quietBudget-held); !inWS && direct == nil && wait > 0 {
			began := time.Now()
			select {
			case msg := <-l.reqs:
				if !answer(msg) {
					return
				}
			case <-time.After(wait):
			case <-l.hurry:
				held = l.quietBudget // someone waits for the whole memory: no more waits
			case <-l.done:
				return
			case <-l.stopped:
				return
			}
			held += time.Since(began)
			continue
		}
		for !inWS && rest < len(l.ids) && len(batch) < limit {
			if !l.sent.Has(rest) && l.ids[rest] != cas.ZeroID {
				batch = append(batch, rest)
			}
			rest++
		}
		if len(batch) == 0 {
			break
		}
		if err := l.deliver(batch, nil, buf); err != nil {
			l.fail(err)
			return
		}
		if inWS {
			l.stats.prefetched.Add(int64(len(batch)))
		} else {
			l.stats.pushed.Add(int64(len(batch)))
		}
		select {
		case <-l.done:
			return
		case <-l.stopped:
			return
		default:
		}
	}
	// Requests that came while the last batch went out, then the end.
	for {
		msg, ok := pending()
		if !ok {
			break
		}
		if !answer(msg) {
			return
		}
	}
	l.ended.Store(true)
	if err := l.pw.end(l.plan.ramID); err != nil {
		l.fail(fmt.Errorf("ending the migration: %w", err))
	}
}

// useDirect hands the writer d to place pages with; false (d then the
// caller's to close) once the writer has ended.
func (l *lazyMemory) useDirect(d *directRAM) bool {
	l.directMu.Lock()
	defer l.directMu.Unlock()
	if l.directEnded {
		return false
	}
	l.direct.Store(d)
	return true
}

// dropDirect ends the direct placement, when the writer ends.
func (l *lazyMemory) dropDirect() {
	l.directMu.Lock()
	defer l.directMu.Unlock()
	l.directEnded = true
	if d := l.direct.Swap(nil); d != nil {
		d.close()
	}
}

// deliver gets pages to QEMU: placed straight into guest RAM once that
// can be (directRAM), else through the stream (send). Pages that hold
// zeros go only when asked for.
func (l *lazyMemory) deliver(pages []int, asked map[int]bool, buf []byte) error {
	if d := l.direct.Load(); d != nil {
		return l.place(d, pages, asked, buf)
	}
	return l.send(pages, asked, buf)
}

// place reads pages from the store and places those that hold data
// straight into guest RAM (directRAM), a run of consecutive pages at a
// time; zero pages are placed only when asked for, and are otherwise left
// to the kernel, as send leaves them.
func (l *lazyMemory) place(d *directRAM, pages []int, asked map[int]bool, buf []byte) error {
	var ids []cas.ID
	var ps []int
	var zeros [memstore.PageSize]byte
	h := xxhash.NewWithSeed(l.sums.seed)
	for _, p := range pages {
		if l.ids[p] != cas.ZeroID {
			ids = append(ids, l.ids[p])
			ps = append(ps, p)
		} else if asked[p] {
			if err := d.place(p, zeros[:]); err != nil {
				return err
			}
			l.delivered(h, p, zeros[:])
			l.stats.zeroed.Add(1)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	data := buf[:len(ids)*memstore.PageSize]
	if err := l.readPages(ids, ps, data); err != nil {
		return err
	}
	for i := 0; i < len(ps); {
		j := i + 1
		for j < len(ps) && ps[j] == ps[j-1]+1 {
			j++
		}
		if err := d.place(ps[i], data[i*memstore.PageSize:j*memstore.PageSize]); err != nil {
			return err
		}
		i = j
	}
	for i, p := range ps {
		l.delivered(h, p, data[i*memstore.PageSize:(i+1)*memstore.PageSize])
	}
	l.stats.placed.Add(int64(len(ps)))
	return nil
}

// serve answers one page request: the page and the unsent pages holding
// data that follow it in its window. A block other than guest RAM (the
// small ones went whole before the package) gets zero pages.
func (l *lazyMemory) serve(msg rpMessage, buf []byte) error {
	l.stats.demanded.Add(1)
	if msg.block != guestRAMBlockStr {
		var offs []uint64
		var zero []bool
		for off := msg.start; off < msg.start+uint64(msg.length); off += migrationPage {
			offs = append(offs, off)
			zero = append(zero, true)
		}
		return l.pw.pages(l.plan.ramID, msg.block, offs, nil, zero)
	}
	first := int(msg.start / memstore.PageSize)
	n := int((uint64(msg.length) + memstore.PageSize - 1) / memstore.PageSize)
	if first+n > len(l.ids) || first < 0 {
		return fmt.Errorf("QEMU asked for bytes %d+%d of guest RAM, which has %d pages", msg.start, msg.length, len(l.ids))
	}
	var batch []int
	asked := map[int]bool{}
	for p := first; p < first+n; p++ {
		if !l.sent.Has(p) {
			batch = append(batch, p)
			asked[p] = true
		}
	}
	if len(batch) == 0 {
		return nil // on its way already
	}
	l.record(batch)
	if err := l.deliver(batch, asked, buf); err != nil {
		return err
	}
	for p := first + n; p < len(l.ids) && p < first+lazyWindow; p++ {
		if !l.sent.Has(p) && l.ids[p] != cas.ZeroID {
			l.windows = append(l.windows, p)
		}
	}
	l.queueFrame(first)
	return nil
}

// nextWindow takes the next batch of pages that follow demanded ones
// (serve) and were not sent since, or none.
func (l *lazyMemory) nextWindow(batch []int) []int {
	for len(batch) < lazyBatch && len(l.windows) > 0 {
		if p := l.windows[0]; !l.sent.Has(p) && !slices.Contains(batch, p) {
			batch = append(batch, p)
		}
		l.windows = l.windows[1:]
	}
	return batch
}

// queueFrame notes that the unsent pages near demanded page p whose chunks
// lie in p's zstd frame of a compacted store go out next, after the
// requests waiting (nextFramed): reading p decoded that whole frame (about
// a millisecond for a full one), which the store keeps for a while, and
// the guest's next faults there would each decode it again once it is
// gone. Which pages those are is worked out later, off the demand's path.
func (l *lazyMemory) queueFrame(p int) {
	l.frameOf = append(l.frameOf, p)
}

// framePages returns the unsent pages within a frame's reach of p whose
// chunks lie in the same zstd frame as p's; none when p's chunk is in no
// frame. Pages of other codecs are cheap to read one by one and are left
// to demand and the push.
func (l *lazyMemory) framePages(p int) []int {
	if l.ids[p] == cas.ZeroID {
		return nil
	}
	loc, err := l.store.Lookup(l.ids[p])
	if err != nil || loc.Codec != cas.CodecZstd {
		return nil // a moved chunk is the push's to find
	}
	var near []int
	var ids []cas.ID
	for q := max(0, p-cas.MaxFrameChunks); q < min(len(l.ids), p+cas.MaxFrameChunks+1); q++ {
		if !l.sent.Has(q) && l.ids[q] != cas.ZeroID {
			near = append(near, q)
			ids = append(ids, l.ids[q])
		}
	}
	locs, err := l.store.LookupMany(ids)
	if err != nil {
		return nil
	}
	kept := near[:0]
	for i, q := range near {
		if locs[i].SameFrame(loc) {
			kept = append(kept, q)
		}
	}
	return kept
}

// nextFramed takes the next batch of pages of demanded pages' frames
// (queueFrame) not sent since, or none. Two demands near each other bring
// some pages twice: a page goes out once (QEMU refuses a page it has).
func (l *lazyMemory) nextFramed(batch []int) []int {
	for len(batch) < lazyBatch {
		if len(l.framed) == 0 {
			if len(l.frameOf) == 0 {
				break
			}
			l.framed = l.framePages(l.frameOf[0])
			l.frameOf = l.frameOf[1:]
			continue
		}
		if p := l.framed[0]; !l.sent.Has(p) && !slices.Contains(batch, p) {
			batch = append(batch, p)
		}
		l.framed = l.framed[1:]
	}
	return batch
}

// record adds demanded pages to the working set while its window lasts.
func (l *lazyMemory) record(pages []int) {
	l.traceMu.Lock()
	defer l.traceMu.Unlock()
	if (!l.traceEnd.IsZero() && time.Now().After(l.traceEnd)) || len(l.trace) >= maxWorkingSet {
		return
	}
	for _, p := range pages {
		l.trace = append(l.trace, uint64(p))
	}
}

// send reads pages from the store and writes them out as one RAM part;
// pages that hold zeros go as zero records when asked for (and are not
// sent otherwise).
func (l *lazyMemory) send(pages []int, asked map[int]bool, buf []byte) error {
	var ids []cas.ID
	var offs []uint64
	var zero []bool
	for _, p := range pages {
		z := l.ids[p] == cas.ZeroID
		if z && !asked[p] {
			continue
		}
		offs = append(offs, uint64(p)*memstore.PageSize)
		zero = append(zero, z)
		if !z {
			ids = append(ids, l.ids[p])
		}
	}
	data := buf[:0]
	if len(ids) > 0 {
		data = buf[:len(ids)*memstore.PageSize]
		if err := l.readPages(ids, pages, data); err != nil {
			return err
		}
	}
	// data holds the non-zero pages in order; pages() wants one slot per
	// page, so spread them out (from the back, in place) when zeros mix in.
	if len(ids) != len(offs) && len(ids) > 0 {
		full := make([]byte, len(offs)*memstore.PageSize)
		j := 0
		for i := range offs {
			if !zero[i] {
				copy(full[i*memstore.PageSize:], data[j*memstore.PageSize:(j+1)*memstore.PageSize])
				j++
			}
		}
		data = full
	}
	if err := l.pw.pages(l.plan.ramID, guestRAMBlockStr, offs, data, zero); err != nil {
		return fmt.Errorf("sending pages: %w", err)
	}
	h := xxhash.NewWithSeed(l.sums.seed)
	var zeroPage [memstore.PageSize]byte
	for i, off := range offs {
		page := zeroPage[:]
		if !zero[i] {
			page = data[i*memstore.PageSize : (i+1)*memstore.PageSize]
		} else {
			l.stats.zeroed.Add(1)
		}
		l.delivered(h, int(off/memstore.PageSize), page)
	}
	return nil
}

// readPages reads the chunks ids into data, each checked against its id;
// a failure names the snapshot, the page and the chunk (of pages).
func (l *lazyMemory) readPages(ids []cas.ID, pages []int, data []byte) error {
	locs, err := l.store.LookupMany(ids)
	if err == nil {
		err = l.store.GetLocated(ids, locs, data)
	}
	if err != nil {
		return l.damaged(pages, err)
	}
	return nil
}

// delivered notes page p, holding page, as sent or placed, with its sum
// (h is a scratch digest).
func (l *lazyMemory) delivered(h *xxhash.Digest, p int, page []byte) {
	l.sent.Set(p)
	h.ResetWithSeed(l.sums.seed)
	_, _ = h.Write(page)
	l.sums.sums[p] = h.Sum64()
}

// damaged names the page and chunk that could not be read.
func (l *lazyMemory) damaged(pages []int, err error) error {
	var b [memstore.PageSize]byte
	for _, p := range pages {
		if id := l.ids[p]; id != cas.ZeroID {
			if _, gerr := l.store.Get(id, b[:]); gerr != nil {
				return fmt.Errorf("restoring the memory of snapshot %q: page %d, chunk %s: %w", l.snap, p, id, gerr)
			}
		}
	}
	return fmt.Errorf("restoring the memory of snapshot %q: %w", l.snap, err)
}

// fail ends the restore with err: the machine cannot go on without the
// page it waits for, so its QEMU is killed, err its reason.
func (l *lazyMemory) fail(err error) {
	if connectionLost(err) {
		// QEMU closing the stream is most likely QEMU ending: its exit
		// says why better than the broken connection.
		select {
		case <-l.m.done:
			err = fmt.Errorf("QEMU exited: %w", l.m.exit)
		case <-time.After(500 * time.Millisecond):
		}
	}
	l.failOnce.Do(func() {
		l.err = err
		if !l.m.stopping.Load() && !l.m.stopped() {
			cause := fmt.Errorf("qemu: %s: %w (%w)", l.m.id, err, runner.ErrMemoryNotRestored)
			l.m.failCause.Store(&cause)
			l.m.kill()
		}
		_ = l.conn.Close()
		close(l.done)
	})
}

// connectionLost says whether err is the migration's connection breaking,
// or QEMU's memory going away under a placement.
func connectionLost(err error) bool {
	var op *net.OpError
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.As(err, &op) ||
		errors.Is(err, syscall.ESRCH) // placing a page (directRAM) into a QEMU whose memory is gone
}

// finish is called once QEMU says the migration completed.
func (l *lazyMemory) finish() {
	l.failOnce.Do(func() {
		_ = l.conn.Close()
		close(l.done)
	})
}

// hurryUp ends the grace: someone waits for the whole memory.
func (l *lazyMemory) hurryUp() {
	l.hurryOnce.Do(func() { close(l.hurry) })
}

// stop ends serving for a machine that is stopping.
func (l *lazyMemory) stop() {
	l.stopOnce.Do(func() { close(l.stopped) })
}

// workingSet returns the working set to keep with the snapshot: the one
// pushed, then the pages demanded in the trace window.
func (l *lazyMemory) workingSet() []uint64 {
	l.traceMu.Lock()
	defer l.traceMu.Unlock()
	ws := slices.Clone(l.ws)
	ws = append(ws, l.trace...)
	slices.Sort(ws)
	ws = slices.Compact(ws)
	if len(ws) > maxWorkingSet {
		ws = ws[:maxWorkingSet]
	}
	return ws
}

// restoreLazily loads the device state into m (started with -incoming and
// its memory file empty) and starts serving its memory; it returns once
// QEMU has loaded the devices and waits, paused, for cont.
func (m *Machine) restoreLazily(ctx context.Context, l *lazyMemory, ph *phases) error {
	sock := m.incomingSocket()
	if !m.listening {
		if err := m.listenIncoming(ctx); err != nil {
			return err
		}
	}
	m.lazy.Store(l)
	// A later boxd must not adopt it half-restored: its state says so
	// before the restore returns.
	saved := make(chan struct{})
	go func() {
		defer close(saved)
		if err := m.saveState(); err != nil {
			m.r.logger().Warn("qemu: a later boxd may not stop this machine", "id", m.id, "err", err)
		}
	}()
	defer func() { <-saved }()
	if err := l.start(ctx, sock, ph); err != nil {
		return err
	}
	for {
		st, err := m.Status(ctx)
		if err != nil {
			select {
			case <-m.done:
				return m.exit
			case <-time.After(time.Second):
			}
			return fmt.Errorf("%w; QEMU said: %s", err, m.said())
		}
		if st != "inmigrate" {
			break
		}
		select {
		case <-l.done:
			if l.err != nil {
				return fmt.Errorf("qemu: %s: %w", m.id, l.err)
			}
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	<-saved // before watchLazy can write the state again
	go m.watchLazy(l)
	// QEMU listens for pages: its userfaultfd is there to take.
	go func() {
		d, err := grabDirectRAM(m.PID(), m.memFile, m.spec.MemSize)
		if err != nil {
			m.r.logger().Debug("qemu: pages of a lazy restore go through QEMU", "id", m.id, "err", err)
			return
		}
		if !l.useDirect(d) {
			d.close()
		}
	}()
	return nil
}

// incomingSocket is where m, started with -incoming defer, takes its
// device state once listenIncoming has run.
func (m *Machine) incomingSocket() string { return filepath.Join(m.dir, "load.sock") }

// listenIncoming has QEMU listen for the migration that restores it.
func (m *Machine) listenIncoming(ctx context.Context) error {
	if _, err := m.qmp.execute(ctx, "migrate-incoming", map[string]any{"uri": "unix:" + m.incomingSocket()}); err != nil {
		return fmt.Errorf("qemu: %s: restoring memory: %w", m.id, err)
	}
	m.listening = true
	return nil
}

// watchLazy waits for the lazy restore's end: on success it gives the
// machine its page sums and the capabilities its snapshots need, records
// the working set and marks the machine ready to adopt; on failure the
// server has already killed QEMU.
func (m *Machine) watchLazy(l *lazyMemory) {
	ctx := context.Background()
	for {
		// QEMU's side is asked once the stream has ended; before that, a
		// failure shows as the connection or QEMU ending.
		poll := 50 * time.Millisecond
		if l.ended.Load() {
			poll = 2 * time.Millisecond
		}
		select {
		case <-l.done:
		case <-m.done:
			l.fail(fmt.Errorf("QEMU exited: %w", m.exit))
		case <-time.After(poll):
			if !l.ended.Load() {
				continue
			}
			raw, err := m.qmp.execute(ctx, "query-migrate", nil)
			if err != nil {
				continue
			}
			var st struct {
				Status string `json:"status"`
			}
			_ = json.Unmarshal(raw, &st)
			switch st.Status {
			case "completed":
				if l.ended.Load() {
					l.finish()
				}
			case "failed", "cancelled":
				l.fail(fmt.Errorf("QEMU's side of the migration %s; QEMU said: %s", st.Status, m.said()))
			}
			continue
		}
		break
	}
	if l.err != nil {
		log := m.r.logger().Warn
		if m.stopping.Load() {
			log = m.r.logger().Debug // stopped on purpose
		}
		log("qemu: lazy restore ended before the memory was in place", "id", m.id, "snapshot", l.snap, "err", l.err)
		close(m.restored)
		return
	}
	if _, err := m.qmp.execute(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{
			{"capability": "postcopy-ram", "state": false},
			{"capability": "x-ignore-shared", "state": true},
		},
	}); err != nil {
		l.err = fmt.Errorf("qemu: %s: after restoring memory: %w", m.id, err)
		close(m.restored)
		return
	}
	m.sums = l.sums
	if ws := l.workingSet(); len(ws) > 0 {
		if err := m.r.Graph.SetWorkingSet(l.snap, memstore.DefaultMap, ws); err != nil && !errors.Is(err, os.ErrNotExist) {
			m.r.logger().Debug("qemu: keeping the working set", "snapshot", l.snap, "err", err)
		}
	}
	m.r.logger().Debug("qemu: lazy restore done", "id", m.id, "snapshot", l.snap, "took", time.Since(l.began).Round(time.Microsecond),
		"demanded", l.stats.demanded.Load(), "prefetched", l.stats.prefetched.Load(), "pushed", l.stats.pushed.Load(), "framed", l.stats.framed.Load(), "zeroed", l.stats.zeroed.Load(), "placed", l.stats.placed.Load())
	m.markReady()
	close(m.restored)
	m.r.refillResumeSpares(m.spec)
}

// awaitMemory waits until a lazily restored machine holds all its memory
// (at once for any other machine): snapshots read the memory file.
func (m *Machine) awaitMemory(ctx context.Context) error {
	l := m.lazy.Load()
	if l == nil {
		return nil
	}
	l.hurryUp()
	select {
	case <-m.restored:
	case <-ctx.Done():
		return ctx.Err()
	}
	if l.err != nil {
		return fmt.Errorf("qemu: %s: %w", m.id, l.err)
	}
	return nil
}

// LazyStats says what the lazy restore of m sent so far; ok is false for a
// machine not restored lazily.
func (m *Machine) LazyStats() (stats LazyStats, ok bool) {
	l := m.lazy.Load()
	if l == nil {
		return LazyStats{}, false
	}
	return LazyStats{
		Demanded: l.stats.demanded.Load(), Prefetched: l.stats.prefetched.Load(),
		Pushed: l.stats.pushed.Load(), Framed: l.stats.framed.Load(), Zeroed: l.stats.zeroed.Load(),
		Placed: l.stats.placed.Load(),
		Done:   isClosed(m.restored) && l.err == nil,
	}, true
}

// AwaitMemory waits until all of a lazily restored machine's memory is in
// place (at once for any other machine).
func (m *Machine) AwaitMemory(ctx context.Context) error { return m.awaitMemory(ctx) }

// AwaitRestores hurries every lazy restore under way and waits until each
// has its memory in place or ended: a boxd that exits leaving its boxes
// running must not leave one whose memory it still serves, which no later
// boxd could adopt.
func (r *Runner) AwaitRestores(ctx context.Context) error {
	r.liveMu.Lock()
	var restoring []*Machine
	for _, m := range r.live {
		if l := m.lazy.Load(); l != nil && !isClosed(m.restored) {
			restoring = append(restoring, m)
		}
	}
	r.liveMu.Unlock()
	var errs []error
	for _, m := range restoring {
		if err := m.awaitMemory(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
