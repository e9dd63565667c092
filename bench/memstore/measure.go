package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/snapshotter"
	"golang.org/x/sys/unix"
)

// ---------------------------------------------------------------- part 1

// goFault restores the snapshot one page per fault with no prefetch and
// touches every page in order. different: the toucher runs on CPU 1 and
// every other thread (the handler's included) on CPU 0; otherwise all
// threads run on CPU 0. With over set, every page is served from that
// overlay (host memory) instead of the store. It returns µs per page, wall
// clock and CPU time of the whole process while the pages were touched.
func goFault(g *snapshotter.Graph, snap string, img []byte, orig *unix.CPUSet, different bool, over *memstore.Overlay) (faultRun, memstore.Stats, error) {
	region, err := anon(len(img))
	if err != nil {
		return faultRun{}, memstore.Stats{}, err
	}
	defer func() { _ = unix.Munmap(region) }()
	runtime.GC()
	// Pin first, so that the handler's thread (new or reused) is on CPU 0.
	if err := pinAll(cpuSet(0), -1); err != nil {
		return faultRun{}, memstore.Stats{}, err
	}
	defer func() { _ = pinAll(orig, -1) }()
	r, err := memstore.Start(context.Background(), g, snap, "", region, memstore.Options{FaultAround: 1, Prefetch: []uint64{}, Overlay: over})
	if err != nil {
		return faultRun{}, memstore.Stats{}, err
	}
	cpu := -1
	if different {
		cpu = 1
	}
	c0 := cpuTime()
	d, terr := touch(region, nil, cpu)
	c := cpuTime() - c0
	cerr := r.Close()
	st := r.Stats()
	if err := errors.Join(terr, cerr); err != nil {
		return faultRun{}, st, err
	}
	if !bytes.Equal(region, img) {
		return faultRun{}, st, errors.New("restored memory differs from the snapshot")
	}
	pages := float64(len(img) / pageSize)
	return faultRun{wall: d.Seconds() * 1e6 / pages, cpu: c.Seconds() * 1e6 / pages}, st, nil
}

// faultRun is one run of part 1: µs per page, wall clock and CPU time.
type faultRun struct{ wall, cpu float64 }

// cpuTime is the CPU time this process has used, all its threads together.
func cpuTime() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// memoryOverlay returns an overlay that holds every page of img, for
// serving a restore from host memory as the C baseline does.
func memoryOverlay(img []byte) (*memstore.Overlay, error) {
	pages := make([]uint64, len(img)/pageSize)
	for i := range pages {
		pages[i] = uint64(i)
	}
	o, err := memstore.NewOverlay(pages, nil)
	if err != nil {
		return nil, err
	}
	copy(o.Data(), img)
	return o, nil
}

func faultService(rep *Report, e *env) error {
	pages := faultMiB * mib / pageSize
	fs := &rep.Fault
	fs.Pages = pages
	fs.Content = "no zero pages: runs of random bytes and text"
	root := filepath.Join(e.tmp, "fault")
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	defer func() { g.Close(); os.RemoveAll(root) }()
	benchkit.Progress("== part 1: fault service, %d MiB snapshot, one page per fault", faultMiB)
	img, _ := guestImage(seed, pages, true)
	snap, err := memstore.Capture(context.Background(), g, bytes.NewReader(img), int64(len(img)), memstore.CaptureOptions{Name: "fault"})
	if err != nil {
		return err
	}
	if m, ok := snap.Map(memstore.DefaultMap); ok {
		fs.StoredBytes = m.NewStored
	}
	// The same pages stored compressed, as disk blocks are (and memory was
	// before it was kept raw), in a store of their own: in one store they
	// would be the raw chunks again.
	g2, s2Stored, err := compressedCopy(filepath.Join(e.tmp, "fault-s2"), img)
	if err != nil {
		return fmt.Errorf("compressed copy of the snapshot: %w", err)
	}
	defer func() { g2.Close(); os.RemoveAll(filepath.Join(e.tmp, "fault-s2")) }()
	fs.CompressedStoredBytes = s2Stored
	if fs.StoreReadUs, err = storeRead(g, "fault"); err != nil {
		return fmt.Errorf("reading pages from the store: %w", err)
	}
	benchkit.Progress("  store read alone (GetLocated, one page a call): %.2f µs/page", fs.StoreReadUs)
	over, err := memoryOverlay(img)
	if err != nil {
		return fmt.Errorf("overlay of the snapshot: %w", err)
	}
	defer over.Release()
	twoCPUs := e.twoCPUs()
	var diff, diffS2, diffMem Placement
	var memcpy []float64
	// one runs the C baseline and the Go handler (from the store and from
	// memory) in one placement.
	one := func(i int, name string, different bool, p, ps2, mem *Placement) error {
		placement := "same"
		if different {
			placement = "different"
		}
		c, err := runC(e.bin, placement)
		if err != nil {
			return fmt.Errorf("c baseline, %s: %w", name, err)
		}
		memcpy = append(memcpy, c.memcpyGBps)
		for _, x := range []struct {
			p    *Placement
			g    *snapshotter.Graph
			over *memstore.Overlay
			src  string
		}{{p, g, nil, "store"}, {ps2, g2, nil, "s2"}, {mem, g, over, "memory"}} {
			x.p.add(c)
			run, st, err := goFault(x.g, "fault", img, &e.orig, different, x.over)
			if err != nil {
				return fmt.Errorf("go handler from %s, %s: %w", x.src, name, err)
			}
			x.p.GoRuns, x.p.GoCPURuns = append(x.p.GoRuns, run.wall), append(x.p.GoCPURuns, run.cpu)
			x.p.GoFaults = st.Faults
			benchkit.Progress("  rep %d %-15s C %6.2f µs/page (CPU %6.2f)   Go from %-6s %6.2f µs/page (CPU %6.2f; %d faults)", i+1, name+":", c.usPerPage, c.cpuUsPerPage, x.src, run.wall, run.cpu, st.Faults)
		}
		return nil
	}
	for i := range *reps {
		if err := one(i, "same CPU", false, &fs.SameCPU, &fs.SameCPUCompressed, &fs.SameCPUMemory); err != nil {
			return err
		}
		if !twoCPUs {
			continue
		}
		if err := one(i, "different CPUs", true, &diff, &diffS2, &diffMem); err != nil {
			return err
		}
		c, err := runC(e.bin, "unpinned")
		if err != nil {
			return fmt.Errorf("c baseline, unpinned: %w", err)
		}
		fs.CUnpinnedRuns = append(fs.CUnpinnedRuns, c.usPerPage)
		benchkit.Progress("  rep %d unpinned:       C %6.2f µs/page", i+1, c.usPerPage)
	}
	fs.SameCPU.finish()
	fs.SameCPUCompressed.finish()
	fs.SameCPUMemory.finish()
	if twoCPUs {
		diff.finish()
		diffS2.finish()
		diffMem.finish()
		fs.Different, fs.DifferentCompressed, fs.DifferentMemory = &diff, &diffS2, &diffMem
		fs.CUnpinned = median(fs.CUnpinnedRuns)
	} else {
		benchkit.Progress("  only one CPU available: different-CPU placement skipped")
	}
	fs.CMemcpyGBps = median(memcpy)
	return nil
}

// compressedCopy stores img as snapshot "fault" in a new store at root, its
// pages written as a disk map's are (s2, raw where that saves little),
// under the name a memory map has, and returns the store and the bytes the
// pages took there.
func compressedCopy(root string, img []byte) (*snapshotter.Graph, int64, error) {
	g, err := snapshotter.Open(root)
	if err != nil {
		return nil, 0, err
	}
	d, err := g.NewDraft("")
	if err != nil {
		g.Close()
		return nil, 0, err
	}
	m, err := d.WriteMap(context.Background(), memstore.DefaultMap, snapshotter.KindDisk, bytes.NewReader(img), nil)
	if err == nil {
		_, err = d.Commit("fault", nil)
	} else {
		d.Abort()
	}
	if err != nil {
		g.Close()
		return nil, 0, err
	}
	return g, m.NewStored, nil
}

// storeRead times reading every page of map DefaultMap of snap from the
// store one page per call, as the fault handler does with fault-around 1,
// and returns µs per page.
func storeRead(g *snapshotter.Graph, snap string) (float64, error) {
	mr, err := g.OpenMap(snap, memstore.DefaultMap)
	if err != nil {
		return 0, err
	}
	st := g.Store()
	n := int(mr.Blocks())
	ids := make([]cas.ID, n)
	locs := make([]cas.Location, n)
	for i := range n {
		ids[i] = mr.Block(uint64(i))
		if ids[i] == cas.ZeroID {
			continue
		}
		if locs[i], err = st.Lookup(ids[i]); err != nil {
			return 0, err
		}
	}
	buf := make([]byte, pageSize)
	var rerr error
	d, err := onThread(-1, func() {
		for i := range n {
			if rerr = st.GetLocated(ids[i:i+1], locs[i:i+1], buf); rerr != nil {
				return
			}
		}
	})
	if err := errors.Join(err, rerr); err != nil {
		return 0, err
	}
	return d.Seconds() * 1e6 / float64(n), nil
}

// ---------------------------------------------------------------- part 2

func scatteredRestore(rep *Report, e *env) error {
	pages := restoreMiB * mib / pageSize
	sr := &rep.Restore
	sr.SnapshotPages, sr.TouchedPages = pages, touchedPages
	// The consumer (and the copy) on CPU 1, the handler, the prefetcher
	// and everything else on CPU 0, as a vCPU thread and its handler would
	// be: cross-CPU wake-ups on every fault, every run.
	cpu := -1
	sr.Placement = "scheduler's choice (one CPU)"
	if e.twoCPUs() {
		cpu = 1
		sr.Placement = "consumer on CPU 1; handler, prefetcher and the rest on CPU 0"
	}
	root := filepath.Join(e.tmp, "restore")
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	defer func() { g.Close(); os.RemoveAll(root) }()
	benchkit.Progress("== part 2: scattered restore, %d MiB snapshot, %d pages touched", restoreMiB, touchedPages)
	img, kinds := guestImage(seed+1, pages, false)
	if _, err := memstore.Capture(context.Background(), g, bytes.NewReader(img), int64(len(img)), memstore.CaptureOptions{Name: "guest"}); err != nil {
		return err
	}
	// The same snapshot in a store compacted afterwards (chunks in zstd
	// frames), as the daemon leaves a store in a quiet spell.
	rootZ := filepath.Join(e.tmp, "restore-compacted")
	gz, err := snapshotter.Open(rootZ)
	if err != nil {
		return err
	}
	defer func() { gz.Close(); os.RemoveAll(rootZ) }()
	if _, err := memstore.Capture(context.Background(), gz, bytes.NewReader(img), int64(len(img)), memstore.CaptureOptions{Name: "guest"}); err != nil {
		return err
	}
	cst, err := gz.Store().Compact(context.Background(), cas.CompactOptions{})
	if err != nil {
		return fmt.Errorf("compacting: %w", err)
	}
	sr.CompactedFrames = cst.Frames
	set := rand.New(rand.NewPCG(seed, 2)).Perm(pages)[:touchedPages]
	for _, p := range set {
		if kinds[p] == kindZero {
			sr.ZeroTouched++
		}
	}
	// The touched pages, back to back: the source of the plain copy.
	packed := make([]byte, touchedPages*pageSize)
	for i, p := range set {
		copy(packed[i*pageSize:], img[p*pageSize:(p+1)*pageSize])
	}

	// restore starts a restore, waits for its prefetch, touches the set and
	// checks the pages it touched.
	type outcome struct {
		start, prefetch, touch time.Duration
		st                     memstore.Stats
		ws                     int
	}
	restore := func(g *snapshotter.Graph, opts memstore.Options, save bool) (outcome, error) {
		var o outcome
		region, err := anon(len(img))
		if err != nil {
			return o, err
		}
		defer func() { _ = unix.Munmap(region) }()
		runtime.GC()
		if cpu >= 0 {
			if err := pinAll(cpuSet(0), -1); err != nil {
				return o, err
			}
			defer func() { _ = pinAll(&e.orig, -1) }()
		}
		t0 := time.Now()
		r, err := memstore.Start(context.Background(), g, "guest", "", region, opts)
		if err != nil {
			return o, err
		}
		o.start = time.Since(t0)
		<-r.PrefetchDone()
		o.prefetch = time.Since(t0)
		d, terr := touch(region, set, cpu)
		o.touch = d
		var serr error
		if save {
			serr = r.SaveWorkingSet()
			o.ws = len(r.WorkingSet())
		}
		cerr := r.Close()
		o.st = r.Stats()
		if err := errors.Join(terr, serr, cerr); err != nil {
			return o, err
		}
		for _, p := range set {
			if !bytes.Equal(region[p*pageSize:(p+1)*pageSize], img[p*pageSize:(p+1)*pageSize]) {
				return o, fmt.Errorf("restored page %d differs from the snapshot", p)
			}
		}
		return o, nil
	}
	fill := func(t *TouchResult, o outcome) {
		t.Runs = append(t.Runs, ms(o.touch))
		t.Faults, t.Copied, t.Zeroed, t.Prefetched = o.st.Faults, o.st.Copied, o.st.Zeroed, o.st.Prefetched
	}
	var starts []float64
	for i := range *reps {
		// (a) no help; the first run also records the working set.
		o, err := restore(g, memstore.Options{FaultAround: 1, Prefetch: []uint64{}}, i == 0)
		if err != nil {
			return fmt.Errorf("no help: %w", err)
		}
		if i == 0 {
			sr.Prefetch.WorkingSet = o.ws
		}
		fill(&sr.NoHelp, o)
		starts = append(starts, ms(o.start))
		benchkit.Progress("  rep %d no help:          touch %8.2f ms  (%d faults)", i+1, ms(o.touch), o.st.Faults)
		// (b) fault-around 16.
		o, err = restore(g, memstore.Options{FaultAround: 16, Prefetch: []uint64{}}, false)
		if err != nil {
			return fmt.Errorf("fault-around: %w", err)
		}
		fill(&sr.FaultAround, o)
		starts = append(starts, ms(o.start))
		benchkit.Progress("  rep %d fault-around 16:  touch %8.2f ms  (%d faults)", i+1, ms(o.touch), o.st.Faults)
		// (c) default options: the saved working set is prefetched.
		o, err = restore(g, memstore.Options{}, false)
		if err != nil {
			return fmt.Errorf("prefetch: %w", err)
		}
		fill(&sr.Prefetch.TouchResult, o)
		sr.Prefetch.PrefetchRuns = append(sr.Prefetch.PrefetchRuns, ms(o.prefetch))
		starts = append(starts, ms(o.start))
		benchkit.Progress("  rep %d prefetch:         touch %8.2f ms  (%d faults, %d prefetched; Start→PrefetchDone %.2f ms)", i+1, ms(o.touch), o.st.Faults, o.st.Prefetched, ms(o.prefetch))
		// (e) and (f): (a) and (b) from the compacted store.
		for _, x := range []struct {
			t      *TouchResult
			around int
			name   string
		}{{&sr.Compacted, 1, "compacted, no help:"}, {&sr.CompactedAround, 16, "compacted, around 16:"}} {
			o, err = restore(gz, memstore.Options{FaultAround: x.around, Prefetch: []uint64{}}, false)
			if err != nil {
				return fmt.Errorf("%s %w", x.name, err)
			}
			fill(x.t, o)
			benchkit.Progress("  rep %d %-22s touch %8.2f ms  (%d faults)", i+1, x.name, ms(o.touch), o.st.Faults)
		}
		// (d) a plain copy into fresh anonymous memory.
		dst, err := anon(len(packed))
		if err != nil {
			return err
		}
		runtime.GC()
		d, err := onThread(cpu, func() { copy(dst, packed) })
		_ = unix.Munmap(dst)
		if err != nil {
			return err
		}
		sr.CopyRuns = append(sr.CopyRuns, ms(d))
		benchkit.Progress("  rep %d copy 32 MiB:      %8.2f ms", i+1, ms(d))
	}
	sr.StartMs = median(starts)
	sr.CopyMs = median(sr.CopyRuns)
	for _, t := range []*TouchResult{&sr.NoHelp, &sr.FaultAround, &sr.Prefetch.TouchResult, &sr.Compacted, &sr.CompactedAround} {
		t.Ms = median(t.Runs)
		t.VsCopy = benchkit.Ratio(t.Ms, sr.CopyMs)
	}
	sr.Prefetch.PrefetchMs = median(sr.Prefetch.PrefetchRuns)
	sr.Prefetch.PrefetchVsCopy = benchkit.Ratio(sr.Prefetch.PrefetchMs, sr.CopyMs)
	return nil
}

// ---------------------------------------------------------------- part 3

// countingReader is a bytes.Reader that counts the pages read through it.
type countingReader struct {
	r     *bytes.Reader
	bytes atomic.Int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.bytes.Add(int64(n))
	return n, err
}

func captureBench(rep *Report, tmp string) error {
	pages := captureMiB * mib / pageSize
	cr := &rep.Capture
	cr.RegionBytes = int64(pages) * pageSize
	benchkit.Progress("== part 3: capture of %d MiB, full and with %.0f%% of the pages dirty", captureMiB, dirtyFrac*100)
	img, _ := guestImage(seed+2, pages, false)
	// The changed memory: 10% of the pages, scattered, rewritten with new
	// random bytes or text.
	next := bytes.Clone(img)
	r := rand.New(rand.NewPCG(seed, 3))
	var key [32]byte
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	c := rand.NewChaCha8(key)
	ndirty := int(float64(pages) * dirtyFrac)
	dirty := memstore.NewBitmap(pages)
	for _, p := range r.Perm(pages)[:ndirty] {
		dirty.Set(p)
		fillPage(next[p*pageSize:(p+1)*pageSize], kindRandom+r.IntN(2), r, c, -p)
	}
	cr.DirtyPages = dirty.Count()
	var full, dirt, again []float64
	// capture times one capture into g and returns its seconds, new
	// chunks and pages read.
	capture := func(g *snapshotter.Graph, src []byte, opts memstore.CaptureOptions) (float64, int64, int, error) {
		runtime.GC()
		rd := &countingReader{r: bytes.NewReader(src)}
		t0 := time.Now()
		s, err := memstore.Capture(context.Background(), g, rd, int64(len(src)), opts)
		d := time.Since(t0).Seconds()
		if err != nil {
			return 0, 0, 0, fmt.Errorf("capturing %s: %w", opts.Name, err)
		}
		m, _ := s.Map(memstore.DefaultMap)
		return d, m.NewChunks, int(rd.bytes.Load() / pageSize), nil
	}
	// Each repetition uses two fresh stores, so that no capture finds the
	// changed pages stored already: one for the full capture and the
	// dirty-bitmap capture, one for a second full capture and the changed
	// memory captured in full with the parent set.
	for i := range *reps {
		err := withGraph(filepath.Join(tmp, fmt.Sprintf("capture-%d-a", i)), func(g *snapshotter.Graph) error {
			d, nc, rp, err := capture(g, img, memstore.CaptureOptions{Name: "base"})
			if err != nil {
				return err
			}
			full = append(full, d)
			cr.Full.NewChunks, cr.Full.ReadPages = nc, rp
			benchkit.Progress("  rep %d full:                  %6.3f s  (%d new chunks)", i+1, d, nc)
			d, nc, rp, err = capture(g, next, memstore.CaptureOptions{Name: "dirty", Parent: "base", Dirty: dirty})
			if err != nil {
				return err
			}
			dirt = append(dirt, d)
			cr.Dirty.NewChunks, cr.Dirty.ReadPages = nc, rp
			benchkit.Progress("  rep %d dirty bitmap:          %6.3f s  (%d new chunks, %d pages read)", i+1, d, nc, rp)
			if i == 0 {
				return verifySnapshot(g, "dirty", next)
			}
			return nil
		})
		if err == nil {
			err = withGraph(filepath.Join(tmp, fmt.Sprintf("capture-%d-b", i)), func(g *snapshotter.Graph) error {
				d, nc, _, err := capture(g, img, memstore.CaptureOptions{Name: "base"})
				if err != nil {
					return err
				}
				full = append(full, d)
				benchkit.Progress("  rep %d full:                  %6.3f s  (%d new chunks)", i+1, d, nc)
				d, nc, rp, err := capture(g, next, memstore.CaptureOptions{Name: "again", Parent: "base"})
				if err != nil {
					return err
				}
				again = append(again, d)
				cr.Recapture.NewChunks, cr.Recapture.ReadPages = nc, rp
				benchkit.Progress("  rep %d full, parent set:      %6.3f s  (%d new chunks)", i+1, d, nc)
				return nil
			})
		}
		if err != nil {
			return err
		}
	}
	region := float64(cr.RegionBytes) / 1e6
	for _, x := range []struct {
		c    *CaptureRun
		runs []float64
	}{{&cr.Full, full}, {&cr.Dirty, dirt}, {&cr.Recapture, again}} {
		x.c.Runs = x.runs
		x.c.Seconds = median(x.runs)
		x.c.RegionMBps = region / x.c.Seconds
	}
	cr.Dirty.DirtyMBps = float64(cr.DirtyPages) * pageSize / 1e6 / cr.Dirty.Seconds
	return nil
}

// withGraph opens a fresh graph at root, runs f, and removes the root.
func withGraph(root string, f func(*snapshotter.Graph) error) error {
	defer os.RemoveAll(root)
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	err = f(g)
	return errors.Join(err, g.Close())
}

// verifySnapshot restores snap and checks it holds want.
func verifySnapshot(g *snapshotter.Graph, snap string, want []byte) error {
	region, err := anon(len(want))
	if err != nil {
		return err
	}
	defer func() { _ = unix.Munmap(region) }()
	r, err := memstore.Start(context.Background(), g, snap, "", region, memstore.Options{FaultAround: 64, Prefetch: []uint64{}})
	if err != nil {
		return err
	}
	_, terr := touch(region, nil, -1)
	if err := errors.Join(terr, r.Close()); err != nil {
		return err
	}
	if !bytes.Equal(region, want) {
		return fmt.Errorf("snapshot %s differs from the memory it captured", snap)
	}
	return nil
}
