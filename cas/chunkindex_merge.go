package cas

import (
	"fmt"
	"math/bits"
	"slices"
)

// Merging keeps the index a few files however many packs are sealed. Each
// sealed pack adds a small segment; in the background, two neighbouring
// segments merge whenever the older is of the same power of two of entries
// as the newer, or a lower one, newest first: a binary counter that
// tolerates packs of unequal sizes. Each merge moves an entry up at least
// one power of two, so an entry is rewritten at most log2(entries) times in
// the store's life, and the powers decrease strictly from the oldest segment
// to the newest, so the index is at most about log2(packs) segments. A
// segment whose entries are half or more of dead packs is rewritten alone,
// which is how GC's and eviction's removals leave the index. A merge writes
// its output under the name of its newest input, replacing it by rename, and
// then removes the other inputs: after a crash in between, Open finds them
// redundant and removes them.

// maxSegments bounds the list for lookups of absent chunks, which try every
// segment: past it, the smallest neighbours merge.
const maxSegments = 24

// kick starts a background merge, or asks the running one to look again.
func (x *chunkIndex) kick() {
	x.mergeMu.Lock()
	defer x.mergeMu.Unlock()
	if x.ctx.Err() != nil || !x.ready {
		return
	}
	if x.merging {
		x.mergeAgain = true
		return
	}
	x.merging = true
	x.merges.Add(1)
	go x.mergeLoop()
}

func (x *chunkIndex) mergeLoop() {
	defer x.merges.Done()
	for {
		err := x.mergeAll()
		x.mergeMu.Lock()
		x.mergeErr = err
		if !x.mergeAgain || err != nil || x.ctx.Err() != nil {
			x.merging = false
			x.mergeMu.Unlock()
			return
		}
		x.mergeAgain = false
		x.mergeMu.Unlock()
	}
}

// waitMerges waits until no merge runs or is due.
func (x *chunkIndex) waitMerges() error {
	for {
		x.merges.Wait()
		x.mergeMu.Lock()
		idle, err := !x.merging, x.mergeErr
		x.mergeMu.Unlock()
		if idle {
			return err
		}
	}
}

// mergeAll merges until the policy is satisfied.
func (x *chunkIndex) mergeAll() error {
	for {
		run := x.pickMerge()
		if run == nil {
			return nil
		}
		if err := x.merge(run); err != nil {
			return err
		}
	}
}

// pickMerge chooses the next run of neighbouring segments to merge, held
// for the merge, or nil.
func (x *chunkIndex) pickMerge() []*segment {
	x.mu.RLock()
	defer x.mu.RUnlock()
	n := len(x.segs)
	sizes := make([]int, n)
	for i, g := range x.segs {
		for k, p := range g.packs {
			if x.isLive(p) {
				sizes[i] += int(g.counts[k])
			}
		}
	}
	lo, hi := -1, -1
	for i, g := range x.segs {
		if 2*sizes[i] <= g.n {
			lo, hi = i, i+1
			break
		}
	}
	if lo < 0 {
		for i := n - 2; i >= 0; i-- {
			if bits.Len(uint(sizes[i])) <= bits.Len(uint(sizes[i+1])) {
				lo, hi = i, i+2
				break
			}
		}
	}
	switch {
	case lo >= 0:
	case n > maxSegments:
		lo = 0
		for i := range n - 1 {
			if sizes[i]+sizes[i+1] < sizes[lo]+sizes[lo+1] {
				lo = i
			}
		}
		hi = lo + 2
	default:
		return nil
	}
	run := slices.Clone(x.segs[lo:hi])
	for _, g := range run {
		g.hold()
	}
	return run
}

// merge writes the live entries of run as one segment and puts it in the
// run's place.
func (x *chunkIndex) merge(run []*segment) error {
	defer func() {
		for _, g := range run {
			g.release()
		}
	}()
	x.mu.RLock()
	live := x.live.clone()
	x.mu.RUnlock()
	isLive := (&view{live: live}).isLive
	total := 0
	var seq uint64
	for _, g := range run {
		for k, p := range g.packs {
			if isLive(p) {
				total += int(g.counts[k])
			}
		}
		seq = max(seq, g.seq)
	}
	w, err := newSegWriter(x.dir, total)
	if err != nil {
		return err
	}
	err = mergeSegments(x.ctx, run, isLive, func(e *indexEntry, _ bool) error { return w.add(e) })
	if err != nil {
		w.abort()
		return fmt.Errorf("merging index segments: %w", err)
	}
	out, err := w.finish(segmentName(seq))
	if err != nil {
		return fmt.Errorf("merging index segments: %w", err)
	}
	x.mu.Lock()
	i := slices.Index(x.segs, run[0])
	if i < 0 || i+len(run) > len(x.segs) || !slices.Equal(x.segs[i:i+len(run)], run) {
		x.mu.Unlock()
		// Only merges remove segments, one at a time: this cannot be.
		return fmt.Errorf("merging index segments: the run moved")
	}
	var repl []*segment
	if out != nil {
		repl = []*segment{out}
	}
	x.segs = slices.Concat(x.segs[:i], repl, x.segs[i+len(run):])
	x.mu.Unlock()
	for _, g := range run {
		if out == nil || g.path != out.path {
			if err := removeFile(g.path); err != nil {
				return fmt.Errorf("removing merged index segment: %w", err)
			}
		}
		g.release() // the index's hold
	}
	if err := syncDir(x.dir); err != nil {
		return wrapIO("syncing index folder", err)
	}
	return nil
}
