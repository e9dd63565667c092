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
		err := tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err != nil || rec.State != packLive {
				return err
			}
			n := beUint32(k)
			area := int64(rec.Size) - packHeaderSize - trailerSize - int64(rec.Chunks)*entrySize
			use[n] = &PackUsage{Pack: n, Size: int64(rec.Size), ChunkBytes: area}
			return nil
		})
		if err != nil {
			return err
		}
		return tx.Bucket(bucketChunks).ForEach(func(k, v []byte) error {
			loc, err := DecodeLocation(v)
			if err != nil {
				return fmt.Errorf("chunk %x: %w", k, err)
			}
			u := use[loc.Pack]
			if u == nil {
				return nil
			}
			if live(ID(k)) {
				u.LiveChunks++
				u.LiveBytes += int64(loc.Stored)
			} else {
				u.DeadChunks++
				u.DeadBytes += int64(loc.Stored)
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	for _, u := range use {
		u.Unreachable = u.ChunkBytes - u.LiveBytes - u.DeadBytes
	}
	return use, nil
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
	s := w.s
	var st GCStats
	use, err := s.Usage(live)
	if err != nil {
		return st, err
	}
	victims := map[uint32]bool{}
	for n, u := range use {
		st.PacksBefore++
		st.BytesBefore += u.Size
		if u.LiveChunks == 0 || float64(u.Garbage()) >= opts.Threshold*float64(u.ChunkBytes) {
			victims[n] = true
		}
	}
	if len(victims) == 0 {
		st.PacksAfter = st.PacksBefore
		st.BytesAfter = st.BytesBefore
		for _, u := range use {
			st.GarbageRemaining += u.Garbage()
		}
		return st, nil
	}

	// Copy live chunks out of the victims. The stored bytes move as they
	// are, after a check of their hash, so damage is never copied.
	type moved struct {
		id  ID
		loc Location
	}
	var moves []moved
	var dead [][]byte
	var sealed []*packWriter
	var sizes []int64
	var cur *packWriter
	sealCur := func() error {
		if cur == nil {
			return nil
		}
		_, size, err := cur.seal()
		if err != nil {
			return err
		}
		sealed, sizes = append(sealed, cur), append(sizes, size)
		cur = nil
		return nil
	}
	defer func() {
		if cur != nil {
			cur.abort()
		}
	}()
	err = s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketChunks).Cursor()
		buf := make([]byte, ChunkSize)
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			loc, err := DecodeLocation(v)
			if err != nil {
				return err
			}
			if !victims[loc.Pack] {
				continue
			}
			id := ID(k)
			if !live(id) {
				dead = append(dead, append([]byte(nil), k...))
				continue
			}
			if _, err := s.read(id, loc, buf); err != nil {
				return fmt.Errorf("moving live chunk: %w", err)
			}
			stored := make([]byte, loc.Stored)
			f, err := s.file(loc.Pack)
			if err != nil {
				return err
			}
			if _, err := f.ReadAt(stored, int64(loc.Offset)); err != nil {
				return err
			}
			if cur == nil {
				s.filesMu.Lock()
				num := s.nextPack
				s.nextPack++
				s.filesMu.Unlock()
				if cur, err = newPackWriter(s.packsDir, num); err != nil {
					return err
				}
			}
			e, err := cur.add(id, stored, loc.Codec)
			if err != nil {
				return err
			}
			moves = append(moves, moved{id, Location{Pack: cur.num, Offset: e.Offset, Stored: e.Stored, Codec: e.Codec}})
			if cur.size() >= PackTarget {
				if err := sealCur(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err == nil {
		err = sealCur()
	}
	if err != nil {
		return st, fmt.Errorf("gc: %w", err)
	}

	err = s.db.Update(func(tx *bolt.Tx) error {
		chunks, packs := tx.Bucket(bucketChunks), tx.Bucket(bucketPacks)
		for i, p := range sealed {
			rec := packRecord{State: packLive, Chunks: uint32(len(p.entries)), Size: uint64(sizes[i])}
			if err := packs.Put(packKey(p.num), rec.marshal()); err != nil {
				return err
			}
		}
		for _, m := range moves {
			if err := chunks.Put(m.id[:], m.loc.marshal()); err != nil {
				return err
			}
		}
		for _, k := range dead {
			if err := chunks.Delete(k); err != nil {
				return err
			}
		}
		for n := range victims {
			rec := packRecord{State: packDeleting}
			if err := packs.Put(packKey(n), rec.marshal()); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketMeta).Put(keyNextPack, packKey(s.nextPack))
	})
	if err != nil {
		return st, wrapIO("gc: switching index", err)
	}
	for n := range victims {
		// Remove, then forget: a reader holding the old location may
		// open the file until it is gone, and forget then closes it, so
		// no descriptor keeps a deleted pack's space.
		err := os.Remove(s.packPath(n))
		s.forget(n)
		if err != nil && !os.IsNotExist(err) {
			return st, fmt.Errorf("gc: removing %s: %w", packName(n), err)
		}
	}
	if err := syncDir(s.packsDir); err != nil {
		return st, fmt.Errorf("gc: %w", err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		for n := range victims {
			if err := tx.Bucket(bucketPacks).Delete(packKey(n)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return st, wrapIO("gc: forgetting removed packs", err)
	}

	st.ChunksDeleted = int64(len(dead))
	st.ChunksMoved = int64(len(moves))
	for n, u := range use {
		if victims[n] {
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
	st.PacksAfter += len(sealed)
	for _, sz := range sizes {
		st.BytesAfter += sz
	}
	st.BytesFreed = st.BytesBefore - st.BytesAfter
	return st, nil
}
