package cas

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/containerd/errdefs"
)

// chunkIndex maps chunk ids to locations: a list of immutable segment files,
// each listing the chunks of some packs, and which packs are live.
//
// A lookup tries the segments oldest first and returns the first entry in a
// live pack, so a pack that GC or eviction removed drops out of the index at
// once, before any segment is rewritten; a background merge later rewrites
// segments without its entries. A chunk that two live packs hold (GC's copy
// before the switch, a pack found on disk) has two entries; any of them is
// a correct answer, and ForEach yields it once, in the lowest pack.
//
// Pack numbers are never reused, so an entry for a pack that is gone can
// never be mistaken for a chunk of a later pack.
type chunkIndex struct {
	dir string

	// mu protects segs, live and nextSeq. Lookups hold it for reading; a
	// change of the list holds it for writing.
	mu      sync.RWMutex
	segs    []*segment // oldest first
	live    packSet    // the live packs
	nextSeq uint64

	// mergeMu protects ready, merging, mergeAgain and mergeErr, the last
	// merge's error (the index stays correct without the merge).
	mergeMu    sync.Mutex
	ready      bool // Open has marked the live packs: merges may start
	merging    bool
	mergeAgain bool
	mergeErr   error
	merges     sync.WaitGroup
	ctx        context.Context
	cancel     context.CancelFunc
}

func newChunkIndex(dir string) *chunkIndex {
	x := &chunkIndex{dir: dir}
	x.ctx, x.cancel = context.WithCancel(context.Background())
	return x
}

// isLive reports whether pack n is live. The caller holds mu.
func (x *chunkIndex) isLive(n uint32) bool { return x.live.has(n) }

// setLive marks packs live or not. The caller holds mu for writing.
func (x *chunkIndex) setLive(packs []uint32, live bool) {
	for _, n := range packs {
		x.live.set(n, live)
	}
}

// packSet is a set of pack numbers: a bitmap for the numbers a store uses,
// a map for any far beyond them (a stray file's name).
type packSet struct {
	bits []uint64
	far  map[uint32]bool
}

// maxPackBitmap bounds the bitmap (2 MiB).
const maxPackBitmap = 1 << 24

func (p *packSet) has(n uint32) bool {
	if n >= maxPackBitmap {
		return p.far[n]
	}
	w := int(n / 64)
	return w < len(p.bits) && p.bits[w]&(1<<(n%64)) != 0
}

func (p *packSet) set(n uint32, in bool) {
	if n >= maxPackBitmap {
		if p.far == nil {
			p.far = map[uint32]bool{}
		}
		if in {
			p.far[n] = true
		} else {
			delete(p.far, n)
		}
		return
	}
	w := int(n / 64)
	if w >= len(p.bits) {
		p.bits = append(p.bits, make([]uint64, w+1-len(p.bits))...)
	}
	if in {
		p.bits[w] |= 1 << (n % 64)
	} else {
		p.bits[w] &^= 1 << (n % 64)
	}
}

func (p *packSet) clone() packSet {
	return packSet{bits: slices.Clone(p.bits), far: maps.Clone(p.far)}
}

// find returns the location of id. The caller holds mu.
func (x *chunkIndex) find(id *ID) (Location, bool) {
	for _, g := range x.segs {
		for i := g.search(id); g.idAt(i, id); i++ {
			loc := segLocation(g.entries[i*segEntrySize:])
			if x.isLive(loc.Pack) {
				return loc, true
			}
		}
	}
	return Location{}, false
}

// lookup returns the location of id.
func (x *chunkIndex) lookup(id ID) (Location, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return x.find(&id)
}

// owners returns, for each id, its location in the lowest live pack that
// holds it, and whether any does. Unlike find's, the answer does not depend
// on how the segments happen to be merged, so decisions taken apart (which
// copy of a chunk compaction keeps) agree on the copy that is the chunk's,
// as forEach's does.
func (x *chunkIndex) owners(ids []ID) ([]Location, []bool) {
	locs, found := make([]Location, len(ids)), make([]bool, len(ids))
	x.mu.RLock()
	defer x.mu.RUnlock()
	for k := range ids {
		id := &ids[k]
		for _, g := range x.segs {
			for i := g.search(id); g.idAt(i, id); i++ {
				loc := segLocation(g.entries[i*segEntrySize:])
				if x.isLive(loc.Pack) && (!found[k] || loc.Pack < locs[k].Pack) {
					locs[k], found[k] = loc, true
				}
			}
		}
	}
	return locs, found
}

// read calls fn with a lookup function valid during the call: one
// consistent view of the index for many lookups.
func (x *chunkIndex) read(fn func(find func(*ID) (Location, bool))) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	fn(x.find)
}

// publish adds segments and marks packs live and dead, in one step that
// readers see whole. The segments' files must be durable already.
func (x *chunkIndex) publish(segs []*segment, live, dead []uint32) {
	x.add(segs, live, dead)
	x.kick()
}

// start marks packs live once Open knows them all, and lets merges run:
// before, a merge would take every pack for dead.
func (x *chunkIndex) start(live []uint32) {
	x.add(nil, live, nil)
	x.mergeMu.Lock()
	x.ready = true
	x.mergeMu.Unlock()
	x.kick()
}

// add is publish without starting a merge.
func (x *chunkIndex) add(segs []*segment, live, dead []uint32) {
	x.mu.Lock()
	for _, g := range segs {
		if g != nil {
			x.segs = append(x.segs, g)
		}
	}
	x.setLive(live, true)
	x.setLive(dead, false)
	x.mu.Unlock()
}

// newSeq reserves the sequence number of a new segment.
func (x *chunkIndex) newSeq() uint64 {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.nextSeq++
	return x.nextSeq - 1
}

// writeSegment writes the entries (in any order) as a new segment.
func (x *chunkIndex) writeSegment(entries []indexEntry) (*segment, error) {
	slices.SortFunc(entries, func(a, b indexEntry) int { return compareEntries(&a, &b) })
	w, err := newSegWriter(x.dir, len(entries))
	if err != nil {
		return nil, err
	}
	for i := range entries {
		if i > 0 && compareEntries(&entries[i-1], &entries[i]) == 0 {
			continue // a pack lists a chunk twice: one entry is enough
		}
		if err := w.add(&entries[i]); err != nil {
			w.abort()
			return nil, err
		}
	}
	return w.finish(segmentName(x.newSeq()))
}

// packEntries turns a pack's footer into index entries.
func packEntries(num uint32, entries []Entry) []indexEntry {
	out := make([]indexEntry, len(entries))
	for i, e := range entries {
		out[i] = indexEntry{ID: e.ID, Loc: locationOf(num, e)}
	}
	return out
}

// view is a set of segments held open for a long read, and the packs live
// when it was taken. It needs no lock, so its reader may call anything.
type view struct {
	segs []*segment
	live packSet
}

func (x *chunkIndex) view() *view {
	x.mu.RLock()
	defer x.mu.RUnlock()
	v := &view{segs: slices.Clone(x.segs), live: x.live.clone()}
	for _, g := range v.segs {
		g.hold()
	}
	return v
}

func (v *view) release() {
	for _, g := range v.segs {
		g.release()
	}
	v.segs = nil
}

func (v *view) isLive(n uint32) bool { return v.live.has(n) }

// each calls fn for every chunk in a live pack, in id order, once: where
// live packs hold a chunk twice, with the lowest pack.
func (v *view) each(ctx context.Context, fn func(*indexEntry) error) error {
	return mergeSegments(ctx, v.segs, v.isLive, func(e *indexEntry, first bool) error {
		if !first {
			return nil
		}
		return fn(e)
	})
}

// mergeSegments walks the entries of segs in id and pack order, skipping
// those of packs that are not live; first says the entry is the first for
// its id. An entry that two segments hold alike is given once.
func mergeSegments(ctx context.Context, segs []*segment, live func(uint32) bool, fn func(e *indexEntry, first bool) error) error {
	pos := make([]int, len(segs))
	heads := make([]indexEntry, len(segs))
	for k, g := range segs {
		if g.n > 0 {
			heads[k] = g.entry(0)
		}
	}
	var last indexEntry
	started := false
	for step := 0; ; step++ {
		if step%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		best := -1
		for k, g := range segs {
			if pos[k] < g.n && (best < 0 || compareEntries(&heads[k], &heads[best]) < 0) {
				best = k
			}
		}
		if best < 0 {
			return nil
		}
		e := heads[best]
		pos[best]++
		if pos[best] < segs[best].n {
			heads[best] = segs[best].entry(pos[best])
		}
		if !live(e.Loc.Pack) || started && compareEntries(&last, &e) == 0 {
			continue
		}
		first := !started || last.ID != e.ID
		last, started = e, true
		if err := fn(&e, first); err != nil {
			return err
		}
	}
}

// forEach calls fn for every indexed chunk, in id order, outside any lock.
func (x *chunkIndex) forEach(ctx context.Context, fn func(*indexEntry) error) error {
	v := x.view()
	defer v.release()
	return v.each(ctx, fn)
}

// check parses every segment again, as Open does, and names the damaged
// ones: a file changed under the store since. The next Open rebuilds them.
func (x *chunkIndex) check() []Damage {
	v := x.view()
	defer v.release()
	var out []Damage
	for _, g := range v.segs {
		if _, err := parseSegment(g.data); err != nil {
			out = append(out, Damage{Pack: filepath.Join("index", filepath.Base(g.path)), Reason: err.Error()})
		}
	}
	return out
}

// bytes returns the size of the segment files.
func (x *chunkIndex) bytes() int64 {
	x.mu.RLock()
	defer x.mu.RUnlock()
	var n int64
	for _, g := range x.segs {
		n += g.fileSize()
	}
	return n
}

// close stops merging and lets go of every segment.
func (x *chunkIndex) close() {
	x.mergeMu.Lock()
	x.cancel()
	x.mergeMu.Unlock()
	x.merges.Wait()
	x.mu.Lock()
	for _, g := range x.segs {
		g.release()
	}
	x.segs = nil
	x.mu.Unlock()
}

// loadSegments opens the segments in the index folder, oldest first. It
// removes unfinished files and segments made redundant by a later merge
// (every live pack they list is in a later segment), and sets damaged ones
// aside as *.damaged, naming them in damaged. live says which packs are
// live; covered returns, for each live pack, whether a segment lists it.
func (x *chunkIndex) loadSegments(live func(uint32) bool) (covered map[uint32]bool, maxPack int64, damaged []string, err error) {
	if err := os.MkdirAll(x.dir, 0o700); err != nil {
		return nil, -1, nil, fmt.Errorf("creating index folder: %w", err)
	}
	ents, err := os.ReadDir(x.dir)
	if err != nil {
		return nil, -1, nil, fmt.Errorf("listing index segments: %w", err)
	}
	var segs []*segment
	maxPack = -1
	for _, e := range ents {
		name := e.Name()
		path := filepath.Join(x.dir, name)
		if filepath.Ext(name) == ".tmp" {
			_ = os.Remove(path)
			continue
		}
		seq, ok := parseSegmentName(name)
		if !ok {
			continue
		}
		x.nextSeq = max(x.nextSeq, seq+1)
		g, err := openSegment(path)
		if err != nil {
			if !errdefs.IsDataLoss(err) {
				return nil, -1, nil, err
			}
			damaged = append(damaged, err.Error())
			_ = os.Rename(path, path+".damaged")
			continue
		}
		maxPack = max(maxPack, int64(g.packs[len(g.packs)-1]))
		segs = append(segs, g)
	}
	slices.SortFunc(segs, func(a, b *segment) int { return cmp.Compare(a.seq, b.seq) })
	covered = map[uint32]bool{}
	keep := make([]bool, len(segs))
	for i := len(segs) - 1; i >= 0; i-- {
		for _, p := range segs[i].packs {
			if live(p) && !covered[p] {
				covered[p], keep[i] = true, true
			}
		}
	}
	removed := false
	for i, g := range segs {
		if keep[i] {
			x.segs = append(x.segs, g)
			continue
		}
		g.release()
		if err := removeFile(g.path); err != nil {
			return nil, -1, nil, fmt.Errorf("removing redundant index segment: %w", err)
		}
		removed = true
	}
	if removed {
		if err := syncDir(x.dir); err != nil {
			return nil, -1, nil, fmt.Errorf("syncing index folder: %w", err)
		}
	}
	return covered, maxPack, damaged, nil
}
