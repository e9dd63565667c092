package snapshotter

import (
	"context"
	"fmt"
	"math/bits"

	"github.com/boxd-dev/boxd/cas"
	bolt "go.etcd.io/bbolt"
)

// Report is the storage operator's view of the store: what the snapshots
// hold logically, what that costs after deduplication and compression, and
// what could be reclaimed.
type Report struct {
	Snapshots int `json:"snapshots"`
	// LogicalBytes is the sum of the sizes of the snapshots' maps.
	LogicalBytes int64 `json:"logical_bytes"`
	// ZeroBytes is the part of LogicalBytes in all-zero blocks (never stored).
	ZeroBytes int64 `json:"zero_bytes"`
	// ReferencedBytes = LogicalBytes - ZeroBytes: what dedup works on.
	ReferencedBytes int64 `json:"referenced_bytes"`
	UniqueChunks    int64 `json:"unique_chunks"`
	// UniqueBytes is the raw size of the distinct chunks referenced.
	UniqueBytes int64 `json:"unique_bytes"`
	// StoredBytes is what those chunks take in packs, compressed.
	StoredBytes      int64   `json:"stored_bytes"`
	DedupRatio       float64 `json:"dedup_ratio"`       // referenced / unique
	CompressionRatio float64 `json:"compression_ratio"` // unique / stored
	CombinedRatio    float64 `json:"combined_ratio"`    // referenced / stored

	Store     StoreReport      `json:"store"`
	Histogram []RefBucket      `json:"refcount_histogram"`
	PerSnap   []SnapshotReport `json:"per_snapshot"`
}

// StoreReport describes the store's files, whatever the selection.
type StoreReport struct {
	Packs        int   `json:"packs"`
	PackBytes    int64 `json:"pack_bytes"`
	IndexEntries int64 `json:"index_entries"`
	IndexBytes   int64 `json:"index_bytes"`
	// GarbageBytes is pack space no snapshot references.
	GarbageBytes  int64 `json:"garbage_bytes"`
	GarbageChunks int64 `json:"garbage_chunks"`
	// ReclaimableBytes is what `store gc` would free now (packs at least
	// half garbage are rewritten; the rest wait).
	ReclaimableBytes int64 `json:"reclaimable_bytes"`
}

// RefBucket is one row of the reference-count histogram: chunks referenced
// between MinRefs and MaxRefs times by the blocks of all snapshots.
type RefBucket struct {
	MinRefs         int64 `json:"min_refs"`
	MaxRefs         int64 `json:"max_refs"`
	Chunks          int64 `json:"chunks"`
	StoredBytes     int64 `json:"stored_bytes"`
	ReferencedBytes int64 `json:"referenced_bytes"`
}

// SnapshotReport describes one snapshot.
type SnapshotReport struct {
	Name         string `json:"name"`
	Parent       string `json:"parent,omitempty"`
	LogicalBytes int64  `json:"logical_bytes"`
	ZeroBytes    int64  `json:"zero_bytes"`
	// NewBytes are non-zero blocks that differ from the parent; ReusedBytes
	// are non-zero blocks the same as the parent's.
	NewBytes    int64 `json:"new_bytes"`
	ReusedBytes int64 `json:"reused_bytes"`
	// WrittenStoredBytes is what writing the snapshot added to the packs.
	WrittenStoredBytes int64 `json:"written_stored_bytes"`
	// ExclusiveBytes is the stored size of chunks no other snapshot
	// references: what removing it (then gc) frees.
	ExclusiveBytes  int64 `json:"exclusive_bytes"`
	ExclusiveChunks int64 `json:"exclusive_chunks"`
}

// Report builds the dedup report. With names, the totals and per-snapshot
// rows cover those snapshots; reference counts, exclusivity and the store
// section always consider every snapshot.
func (g *Graph) Report(ctx context.Context, names ...string) (Report, error) {
	var rep Report
	all, err := g.List()
	if err != nil {
		return rep, err
	}
	selected, err := g.selectSnapshots(all, names)
	if err != nil {
		return rep, err
	}
	refs, err := g.countRefs(ctx, all)
	if err != nil {
		return rep, err
	}
	st, err := g.store.Stats()
	if err != nil {
		return rep, err
	}
	stored, err := g.storedSizes(refs.blocks)
	if err != nil {
		return rep, err
	}
	union, err := g.reportSnapshots(&rep, all, selected, refs, stored)
	if err != nil {
		return rep, err
	}
	rep.addTotals(union, stored)
	rep.Histogram = refHistogram(refs.blocks, stored)
	store, err := g.storeReport(st)
	if err != nil {
		return rep, err
	}
	rep.Store = store
	return rep, nil
}

// selectSnapshots returns the names of the snapshots the report covers:
// names, each checked to exist, or every snapshot of all when there are
// none.
func (g *Graph) selectSnapshots(all []Snapshot, names []string) (map[string]bool, error) {
	selected := map[string]bool{}
	for _, n := range names {
		if _, err := g.Get(n); err != nil {
			return nil, err
		}
		selected[n] = true
	}
	if len(names) == 0 {
		for _, s := range all {
			selected[s.Name] = true
		}
	}
	return selected, nil
}

// refCounts are the references to each chunk over every snapshot.
type refCounts struct {
	blocks map[cas.ID]int64 // blocks that hold the chunk
	snaps  map[cas.ID]int32 // snapshots that hold the chunk
}

// countRefs counts, over every snapshot, the blocks and the snapshots that
// reference each chunk: what the histogram and exclusivity need.
func (g *Graph) countRefs(ctx context.Context, all []Snapshot) (refCounts, error) {
	refs := refCounts{blocks: map[cas.ID]int64{}, snaps: map[cas.ID]int32{}}
	for _, s := range all {
		if err := ctx.Err(); err != nil {
			return refs, err
		}
		seen := map[cas.ID]struct{}{}
		err := g.eachBlock(s, func(_ MapInfo, _ uint64, id cas.ID) {
			refs.blocks[id]++
			if _, ok := seen[id]; !ok {
				seen[id] = struct{}{}
				refs.snaps[id]++
			}
		})
		if err != nil {
			return refs, err
		}
	}
	return refs, nil
}

// storedSizes returns the stored (compressed) size of each referenced
// chunk the store holds.
func (g *Graph) storedSizes(referenced map[cas.ID]int64) (map[cas.ID]uint32, error) {
	stored := make(map[cas.ID]uint32, len(referenced))
	err := g.store.ForEach(func(id cas.ID, loc cas.Location) error {
		if _, ok := referenced[id]; ok {
			stored[id] = loc.Share()
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return stored, nil
}

// reportSnapshots adds a row for each selected snapshot to rep, and its
// logical and zero bytes to rep's totals. It returns the distinct chunks
// the selected snapshots reference.
func (g *Graph) reportSnapshots(rep *Report, all []Snapshot, selected map[string]bool, refs refCounts, stored map[cas.ID]uint32) (map[cas.ID]struct{}, error) {
	union := map[cas.ID]struct{}{}
	for _, s := range all {
		if !selected[s.Name] {
			continue
		}
		sr, err := g.snapshotReport(s, refs, stored, union)
		if err != nil {
			return nil, err
		}
		rep.Snapshots++
		rep.LogicalBytes += sr.LogicalBytes
		rep.ZeroBytes += sr.ZeroBytes
		rep.PerSnap = append(rep.PerSnap, sr)
	}
	return union, nil
}

// snapshotReport describes snapshot s against its parent, adding the
// chunks it references to union.
func (g *Graph) snapshotReport(s Snapshot, refs refCounts, stored map[cas.ID]uint32, union map[cas.ID]struct{}) (SnapshotReport, error) {
	sr := SnapshotReport{Name: s.Name, Parent: s.Parent}
	parents, err := g.parentTables(s)
	if err != nil {
		return sr, err
	}
	var ref int64
	seen := map[cas.ID]struct{}{}
	err = g.eachBlock(s, func(m MapInfo, n uint64, id cas.ID) {
		b := min(int64(cas.ChunkSize), m.Size-int64(n)*cas.ChunkSize)
		ref += b
		if pt := parents[m.Name]; pt != nil && pt.get(n) == id {
			sr.ReusedBytes += b
		} else {
			sr.NewBytes += b
		}
		union[id] = struct{}{}
		if _, ok := seen[id]; !ok {
			seen[id] = struct{}{}
			if refs.snaps[id] == 1 {
				sr.ExclusiveChunks++
				sr.ExclusiveBytes += int64(stored[id])
			}
		}
	})
	if err != nil {
		return sr, err
	}
	sr.LogicalBytes = s.Size()
	sr.ZeroBytes = sr.LogicalBytes - ref
	for _, m := range s.Maps {
		sr.WrittenStoredBytes += m.NewStored
	}
	return sr, nil
}

// parentTables returns the block tables of s's parent's maps, by map name
// (none when s has no parent), to tell s's new blocks from reused ones.
func (g *Graph) parentTables(s Snapshot) (map[string]*table, error) {
	parents := map[string]*table{}
	if s.Parent == "" {
		return parents, nil
	}
	parent, err := g.Get(s.Parent)
	if err != nil {
		return nil, err
	}
	for _, m := range parent.Maps {
		t, err := g.resolve(parent, m.Name)
		if err != nil {
			return nil, err
		}
		parents[m.Name] = t
	}
	return parents, nil
}

// addTotals completes rep's totals and ratios from the distinct chunks
// union the selected snapshots reference.
func (rep *Report) addTotals(union map[cas.ID]struct{}, stored map[cas.ID]uint32) {
	rep.ReferencedBytes = rep.LogicalBytes - rep.ZeroBytes
	rep.UniqueChunks = int64(len(union))
	rep.UniqueBytes = rep.UniqueChunks * cas.ChunkSize
	for id := range union {
		rep.StoredBytes += int64(stored[id])
	}
	rep.DedupRatio = ratio(rep.ReferencedBytes, rep.UniqueBytes)
	rep.CompressionRatio = ratio(rep.UniqueBytes, rep.StoredBytes)
	rep.CombinedRatio = ratio(rep.ReferencedBytes, rep.StoredBytes)
}

// refHistogram sorts every referenced chunk into power-of-two buckets of
// its block reference count, leaving out the empty buckets.
func refHistogram(blockRefs map[cas.ID]int64, stored map[cas.ID]uint32) []RefBucket {
	var hist []RefBucket
	for id, refs := range blockRefs {
		i := bits.Len64(uint64(refs - 1)) // 1 → 0, 2 → 1, 3-4 → 2, 5-8 → 3
		for len(hist) <= i {
			k := len(hist)
			lo := int64(1)
			if k > 0 {
				lo = int64(1)<<(k-1) + 1
			}
			hist = append(hist, RefBucket{MinRefs: lo, MaxRefs: int64(1) << k})
		}
		hist[i].Chunks++
		hist[i].StoredBytes += int64(stored[id])
		hist[i].ReferencedBytes += refs * cas.ChunkSize
	}
	var out []RefBucket
	for _, b := range hist {
		if b.Chunks > 0 {
			out = append(out, b)
		}
	}
	return out
}

// storeReport describes the store's files from st, and its garbage against
// what every snapshot references.
func (g *Graph) storeReport(st cas.StoreStats) (StoreReport, error) {
	sr := StoreReport{Packs: st.Packs, PackBytes: st.PackBytes, IndexEntries: st.Chunks, IndexBytes: st.IndexBytes}
	live, err := g.liveSet()
	if err != nil {
		return sr, err
	}
	use, err := g.store.Usage(func(id cas.ID) bool { _, ok := live[id]; return ok })
	if err != nil {
		return sr, err
	}
	for _, u := range use {
		sr.GarbageBytes += u.Garbage()
		sr.GarbageChunks += u.DeadChunks
		if u.LiveChunks == 0 {
			sr.ReclaimableBytes += u.Size
		} else if 2*u.Garbage() >= u.ChunkBytes {
			sr.ReclaimableBytes += u.Garbage()
		}
	}
	return sr, nil
}

func ratio(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// eachBlock calls fn for every non-zero block of every map of s.
func (g *Graph) eachBlock(s Snapshot, fn func(m MapInfo, n uint64, id cas.ID)) error {
	for _, m := range s.Maps {
		t, err := g.resolve(s, m.Name)
		if err != nil {
			return err
		}
		_ = t.each(func(n uint64, id cas.ID) error {
			fn(m, n, id)
			return nil
		})
	}
	return nil
}

// Problem names one thing Verify found wrong in the graph.
type Problem struct {
	Snapshot string `json:"snapshot"`
	Map      string `json:"map,omitempty"`
	Chunk    string `json:"chunk,omitempty"`
	Reason   string `json:"reason"`
}

// VerifyResult is the store's verification plus the graph's.
type VerifyResult struct {
	cas.VerifyResult
	Snapshots int       `json:"snapshots"`
	Problems  []Problem `json:"problems"`
}

// OK reports whether nothing is damaged or missing.
func (r VerifyResult) OK() bool { return len(r.Damaged) == 0 && len(r.Problems) == 0 }

// Verify checks every pack and chunk (cas.Store.Verify), every snapshot's
// deltas, and that every chunk a snapshot names is stored and undamaged.
func (g *Graph) Verify(ctx context.Context, progress func(done, total int64)) (VerifyResult, error) {
	var res VerifyResult
	cv, err := g.store.Verify(ctx, progress)
	if err != nil {
		return res, err
	}
	res.VerifyResult = cv
	damaged := map[string]bool{}
	for _, d := range cv.Damaged {
		if d.Chunk != "" {
			damaged[d.Chunk] = true
		}
	}
	all, err := g.List()
	if err != nil {
		return res, err
	}
	res.Snapshots = len(all)
	for _, s := range all {
		for _, m := range s.Maps {
			var v []byte
			err := g.db.View(func(tx *bolt.Tx) error {
				v = append(v, tx.Bucket(bucketDeltas).Get(deltaKey(s.Name, m.Name))...)
				return nil
			})
			if err != nil {
				return res, err
			}
			changes, err := decodeDelta(v)
			if err != nil {
				res.Problems = append(res.Problems, Problem{Snapshot: s.Name, Map: m.Name, Reason: err.Error()})
				continue
			}
			for _, c := range changes {
				if c.ID == cas.ZeroID {
					continue
				}
				switch {
				case damaged[c.ID.String()]:
					res.Problems = append(res.Problems, Problem{Snapshot: s.Name, Map: m.Name, Chunk: c.ID.String(), Reason: fmt.Sprintf("block %d is stored in a damaged chunk", c.Block)})
				case !g.store.Has(c.ID):
					res.Problems = append(res.Problems, Problem{Snapshot: s.Name, Map: m.Name, Chunk: c.ID.String(), Reason: fmt.Sprintf("block %d names a chunk missing from the store", c.Block)})
				}
			}
		}
	}
	return res, nil
}
