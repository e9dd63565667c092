package cas

import (
	"context"
	"fmt"
	"os"

	bolt "go.etcd.io/bbolt"
)

// GCOptions tune a collection.
type GCOptions struct {
	// Threshold is the fraction of a pack's chunk bytes that must be garbage
	// before the pack is rewritten. Packs holding only garbage are always
	// deleted. Zero means the default, 0.5.
	Threshold float64
}

// GCStats says what a collection did.
type GCStats struct {
	PacksBefore      int   `json:"packs_before"`
	PacksAfter       int   `json:"packs_after"`
	PacksDeleted     int   `json:"packs_deleted"`
	PacksRewritten   int   `json:"packs_rewritten"`
	ChunksDeleted    int64 `json:"chunks_deleted"`
	ChunksMoved      int64 `json:"chunks_moved"`
	BytesBefore      int64 `json:"bytes_before"`
	BytesAfter       int64 `json:"bytes_after"`
	BytesFreed       int64 `json:"bytes_freed"`
	GarbageRemaining int64 `json:"garbage_remaining_bytes"`
}

// PackUsage is how much of one pack is referenced.
type PackUsage struct {
	Pack        uint32
	Size        int64 // bytes of the pack file
	ChunkBytes  int64 // bytes of its chunk area
	LiveBytes   int64 // stored bytes of live chunks
	LiveChunks  int64
	DeadChunks  int64 // indexed chunks nothing references
	DeadBytes   int64
	Unreachable int64 // bytes of chunks the index points elsewhere for
}

// Garbage returns the bytes of the pack that nothing references.
func (u PackUsage) Garbage() int64 { return u.ChunkBytes - u.LiveBytes }

// Usage measures every pack against live, which says whether a chunk is
// referenced.
func (s *Store) Usage(live func(ID) bool) (map[uint32]*PackUsage, error) {
	use := map[uint32]*PackUsage{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err != nil || rec.State != packLive {
				return err
			}
			n := beUint32(k)
			area := int64(rec.Size) - packHeaderSize - trailerSize - int64(rec.Chunks)*entrySize
			use[n] = &PackUsage{Pack: n, Size: int64(rec.Size), ChunkBytes: area}
			return nil
		})
	})
	if err == nil {
		err = s.idx.forEach(context.Background(), func(e *indexEntry) error {
			u := use[e.Loc.Pack]
			if u == nil {
				return nil
			}
			if live(e.ID) {
				u.LiveChunks++
				u.LiveBytes += int64(e.Loc.Share())
			} else {
				u.DeadChunks++
				u.DeadBytes += int64(e.Loc.Share())
			}
			return nil
		})
	}
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	for _, u := range use {
		if area, ok := s.chunkArea(u.Pack); ok {
			u.ChunkBytes = area
		}
		u.Unreachable = u.ChunkBytes - u.LiveBytes - u.DeadBytes
	}
	return use, nil
}

// chunkArea reads the size of pack num's chunk area from its trailer: a
// packed footer's size does not follow from the number of chunks.
func (s *Store) chunkArea(num uint32) (int64, bool) {
	_, off, err := s.packEnds(num)
	if err != nil {
		return 0, false
	}
	return int64(off) - packHeaderSize, true
}

// GC removes every chunk for which live returns false. Packs made only of
// garbage are deleted; packs whose garbage reaches the threshold have their
// live chunks copied into new packs and are then deleted. Order: new packs
// are sealed, then one index transaction moves the live chunks and marks the
// old packs for deletion, then the old files go. A crash anywhere leaves
// every live chunk readable.
func (s *Store) GC(ctx context.Context, live func(ID) bool, opts GCOptions) (GCStats, error) {
	w := s.NewWriter()
	defer w.Abort()
	return w.GC(ctx, live, opts)
}

// GC is Store.GC run by the holder of the write lock, for callers that must
// take the lock before deciding what is live.
func (w *Writer) GC(ctx context.Context, live func(ID) bool, opts GCOptions) (GCStats, error) {
	if opts.Threshold <= 0 || opts.Threshold > 1 {
		opts.Threshold = 0.5
	}
	use, err := w.s.Usage(live)
	if err != nil {
		return GCStats{}, err
	}
	st := statsBefore(use)
	victims := pickVictims(use, opts.Threshold)
	if len(victims) == 0 {
		return statsUnchanged(st, use), nil
	}
	run := &gcRun{s: w.s, live: live, victims: victims}
	defer run.abortUnsealed()
	// The write order of the package doc: new packs, index, old packs.
	if err := run.copyLive(ctx); err != nil {
		return st, err
	}
	if err := run.switchIndex(); err != nil {
		return st, err
	}
	if err := run.removeVictims(); err != nil {
		return st, err
	}
	if err := run.forgetVictims(); err != nil {
		return st, err
	}
	return run.statsAfter(st, use), nil
}

// statsBefore counts the packs and bytes a collection starts from.
func statsBefore(use map[uint32]*PackUsage) GCStats {
	var st GCStats
	for _, u := range use {
		st.PacksBefore++
		st.BytesBefore += u.Size
	}
	return st
}

// pickVictims chooses the packs worth collecting: those with no live chunk,
// and those whose garbage reaches threshold of their chunk bytes.
func pickVictims(use map[uint32]*PackUsage, threshold float64) map[uint32]bool {
	victims := map[uint32]bool{}
	for n, u := range use {
		if u.LiveChunks == 0 || float64(u.Garbage()) >= threshold*float64(u.ChunkBytes) {
			victims[n] = true
		}
	}
	return victims
}

// statsUnchanged completes st for a collection that had no pack to collect.
func statsUnchanged(st GCStats, use map[uint32]*PackUsage) GCStats {
	st.PacksAfter = st.PacksBefore
	st.BytesAfter = st.BytesBefore
	for _, u := range use {
		st.GarbageRemaining += u.Garbage()
	}
	return st
}

// movedChunk is a live chunk's new location in a pack GC wrote.
type movedChunk struct {
	id  ID
	loc Location
}

// gcRun is one collection's work, handed from phase to phase.
type gcRun struct {
	s       *Store
	live    func(ID) bool
	victims map[uint32]bool // packs being collected

	moves  []movedChunk  // live chunks copied out of the victims
	dead   int64         // the victims' garbage chunks
	sealed []*packWriter // new packs, sealed
	sizes  []int64       // file sizes of sealed
	cur    *packWriter   // the new pack being written, if any
}

// copyLive copies the victims' live chunks into new packs and seals them,
// so that they are durable before the index names them. The stored bytes
// move as they are, after a check of their hash, so damage is never
// copied. Garbage chunks are only noted.
func (r *gcRun) copyLive(ctx context.Context) error {
	buf := make([]byte, ChunkSize)
	err := r.s.idx.forEach(ctx, func(e *indexEntry) error {
		if !r.victims[e.Loc.Pack] {
			return nil
		}
		if !r.live(e.ID) {
			r.dead++
			return nil
		}
		return r.moveChunk(e.ID, e.Loc, buf)
	})
	if err == nil {
		err = r.sealCurrent()
	}
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	return nil
}

// moveChunk checks live chunk id at loc (buf is scratch for the check) and
// appends its stored bytes to the current new pack, sealing the pack once
// it reaches PackTarget. A chunk of a zstd frame moves alone, compressed
// with s2 again: the rest of its frame may be garbage.
func (r *gcRun) moveChunk(id ID, loc Location, buf []byte) error {
	s := r.s
	raw, err := s.read(id, loc, buf)
	if err != nil {
		return fmt.Errorf("moving live chunk: %w", err)
	}
	var stored []byte
	codec := loc.Codec
	if codec == CodecZstd {
		stored, codec = encodeChunk(raw, nil)
		stored = append([]byte(nil), stored...)
	} else {
		stored = make([]byte, loc.Stored)
		f, err := s.file(loc.Pack)
		if err != nil {
			return err
		}
		if _, err := f.ReadAt(stored, int64(loc.Offset)); err != nil {
			return err
		}
	}
	if err := r.startPack(0); err != nil {
		return err
	}
	e, err := r.cur.add(id, stored, codec)
	if err != nil {
		return err
	}
	r.moves = append(r.moves, movedChunk{id, locationOf(r.cur.num, e)})
	if r.cur.size() >= PackTarget {
		return r.sealCurrent()
	}
	return nil
}

// sealCurrent seals the new pack being written, if any.
func (r *gcRun) sealCurrent() error {
	if r.cur == nil {
		return nil
	}
	_, size, err := r.cur.seal()
	if err != nil {
		return err
	}
	r.sealed, r.sizes = append(r.sealed, r.cur), append(r.sizes, size)
	r.cur = nil
	return nil
}

// abortUnsealed drops the new pack a failed collection left unsealed.
func (r *gcRun) abortUnsealed() {
	if r.cur != nil {
		r.cur.abort()
	}
}

// switchIndex moves the index to the new packs: it writes their index
// segment, then in one transaction records them, marks the victims for
// deletion (which takes the victims' chunks, garbage and moved ones, out of
// the index) and records the next pack number.
func (r *gcRun) switchIndex() error {
	s := r.s
	var entries []indexEntry
	for _, m := range r.moves {
		entries = append(entries, indexEntry{ID: m.id, Loc: m.loc})
	}
	g, err := s.idx.writeSegment(entries)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	var sealed, victims []uint32
	err = s.db.Update(func(tx *bolt.Tx) error {
		packs := tx.Bucket(bucketPacks)
		for i, p := range r.sealed {
			rec := packRecord{State: packLive, Chunks: uint32(len(p.entries)), Size: uint64(r.sizes[i])}
			if err := packs.Put(packKey(p.num), rec.marshal()); err != nil {
				return err
			}
			sealed = append(sealed, p.num)
		}
		for n := range r.victims {
			rec := packRecord{State: packDeleting}
			if err := packs.Put(packKey(n), rec.marshal()); err != nil {
				return err
			}
			victims = append(victims, n)
		}
		return tx.Bucket(bucketMeta).Put(keyNextPack, packKey(s.nextPack))
	})
	if err != nil {
		if g != nil {
			g.release()
		}
		return wrapIO("gc: switching index", err)
	}
	s.idx.publish([]*segment{g}, sealed, victims)
	if len(victims) > 0 {
		s.moves.Add(1)
	}
	return nil
}

// removeVictims deletes the victims' files, which the index no longer
// names, and makes the deletions durable.
func (r *gcRun) removeVictims() error {
	s := r.s
	for n := range r.victims {
		// Remove, then forget: a reader holding the old location may
		// open the file until it is gone, and forget then closes it, so
		// no descriptor keeps a deleted pack's space.
		err := os.Remove(s.packPath(n))
		s.forget(n)
		if err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("gc: removing %s: %w", packName(n), err)
		}
	}
	if err := syncDir(s.packsDir); err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	return nil
}

// forgetVictims deletes the records of the removed packs from the index.
func (r *gcRun) forgetVictims() error {
	err := r.s.db.Update(func(tx *bolt.Tx) error {
		for n := range r.victims {
			if err := tx.Bucket(bucketPacks).Delete(packKey(n)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return wrapIO("gc: forgetting removed packs", err)
	}
	return nil
}

// statsAfter completes st with what the collection did.
func (r *gcRun) statsAfter(st GCStats, use map[uint32]*PackUsage) GCStats {
	st.ChunksDeleted = r.dead
	st.ChunksMoved = int64(len(r.moves))
	for n, u := range use {
		if r.victims[n] {
			if u.LiveChunks == 0 {
				st.PacksDeleted++
			} else {
				st.PacksRewritten++
			}
			continue
		}
		st.PacksAfter++
		st.BytesAfter += u.Size
		st.GarbageRemaining += u.Garbage()
	}
	st.PacksAfter += len(r.sealed)
	for _, sz := range r.sizes {
		st.BytesAfter += sz
	}
	st.BytesFreed = st.BytesBefore - st.BytesAfter
	return st
}
