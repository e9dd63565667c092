package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// Damage names one problem Verify found.
type Damage struct {
	Pack   string `json:"pack"`
	Chunk  string `json:"chunk,omitempty"`
	Offset int64  `json:"offset,omitempty"`
	Reason string `json:"reason"`
}

func (d Damage) String() string {
	if d.Chunk == "" {
		return fmt.Sprintf("%s: %s", d.Pack, d.Reason)
	}
	return fmt.Sprintf("%s: chunk %s at offset %d: %s", d.Pack, d.Chunk, d.Offset, d.Reason)
}

// VerifyResult is what Verify checked and found.
type VerifyResult struct {
	Packs   int      `json:"packs"`
	Chunks  int64    `json:"chunks"`
	Bytes   int64    `json:"bytes"`
	Damaged []Damage `json:"damaged"`
}

// Verify reads every pack, checks its footer, re-hashes every chunk in it,
// checks every index segment again as Open does, and checks that every
// index entry points at a chunk that a footer lists.
// progress, when not nil, is called with the bytes read so far.
func (s *Store) Verify(ctx context.Context, progress func(done, total int64)) (VerifyResult, error) {
	var res VerifyResult
	nums, err := s.listPacks(false)
	if err != nil {
		return res, err
	}
	var total int64
	for _, n := range nums {
		if fi, err := os.Stat(s.packPath(n)); err == nil {
			total += fi.Size()
		}
	}
	type packResult struct {
		entries map[uint64]Entry // by entryKey
		damaged []Damage
		chunks  int64
		size    int64
	}
	results := make([]packResult, len(nums))
	var mu sync.Mutex
	var done int64
	next := make(chan int)
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			for i := range next {
				r := &results[i]
				r.entries, r.damaged, r.size = s.verifyPack(nums[i])
				r.chunks = int64(len(r.entries))
				mu.Lock()
				done += r.size
				if progress != nil {
					progress(done, total)
				}
				mu.Unlock()
			}
		})
	}
	for i := range nums {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return res, err
	}
	footers := map[uint32]map[uint64]Entry{}
	// sealedSince caches, for a pack the index names but Verify did not
	// list, whether it exists now: a Writer or GC sealed it meanwhile.
	sealedSince := map[uint32]bool{}
	for i, r := range results {
		if r.entries == nil && r.damaged == nil {
			continue // removed by GC since it was listed
		}
		res.Packs++
		res.Chunks += r.chunks
		res.Bytes += r.size
		res.Damaged = append(res.Damaged, r.damaged...)
		footers[nums[i]] = r.entries
	}
	res.Damaged = append(res.Damaged, s.idx.check()...)
	err = s.idx.forEach(ctx, func(e *indexEntry) error {
		id, loc := e.ID, e.Loc
		f, ok := footers[loc.Pack]
		if !ok {
			sealed, seen := sealedSince[loc.Pack]
			if !seen {
				_, err := os.Stat(s.packPath(loc.Pack))
				sealed = err == nil
				sealedSince[loc.Pack] = sealed
			}
			if sealed {
				return nil
			}
			res.Damaged = append(res.Damaged, Damage{Pack: packName(loc.Pack), Chunk: id.String(), Offset: int64(loc.Offset), Reason: "indexed in a pack that is missing"})
			return nil
		}
		if f == nil {
			return nil // the pack's damage is already reported
		}
		e2, ok := f[entryKey(loc.Offset, loc.Slot)]
		if !ok || e2.ID != id || locationOf(loc.Pack, e2) != loc {
			res.Damaged = append(res.Damaged, Damage{Pack: packName(loc.Pack), Chunk: id.String(), Offset: int64(loc.Offset), Reason: "index entry disagrees with the pack footer"})
		}
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("reading index: %w", err)
	}
	return res, nil
}

// verifyPack checks one pack. entries is nil when the footer is unreadable.
func (s *Store) verifyPack(num uint32) (map[uint64]Entry, []Damage, int64) {
	name := packName(num)
	f, err := os.Open(s.packPath(num))
	if errors.Is(err, fs.ErrNotExist) {
		// GC removed it since it was listed; Verify skips it, and its
		// index check reports any entry still pointing at it.
		return nil, nil, 0
	}
	if err != nil {
		return nil, []Damage{{Pack: name, Reason: err.Error()}}, 0
	}
	defer f.Close()
	entries, size, err := readFooter(f)
	if err != nil {
		return nil, []Damage{{Pack: name, Reason: "footer unreadable: " + err.Error()}}, size
	}
	data := make([]byte, size)
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, []Damage{{Pack: name, Reason: err.Error()}}, size
	}
	var damaged []Damage
	byOffset := make(map[uint64]Entry, len(entries))
	out := make([]byte, ChunkSize)
	var frames lastFrame
	for _, e := range entries {
		byOffset[entryKey(e.Offset, e.Slot)] = e
		stored := data[e.Offset : e.Offset+e.Stored]
		raw, err := frames.decode(e, stored, out)
		if err == nil && sha256.Sum256(raw) != e.ID {
			err = fmt.Errorf("content does not match its id")
		}
		if err != nil {
			damaged = append(damaged, Damage{Pack: name, Chunk: e.ID.String(), Offset: int64(e.Offset), Reason: err.Error()})
		}
	}
	return byOffset, damaged, size
}

// StoreStats sums up the store's files.
type StoreStats struct {
	Packs       int   `json:"packs"`
	PackBytes   int64 `json:"pack_bytes"`
	Chunks      int64 `json:"index_entries"`
	StoredBytes int64 `json:"stored_bytes"`
	IndexBytes  int64 `json:"index_bytes"` // index.db and the index segments
}

// Stats reads the index's totals.
func (s *Store) Stats() (StoreStats, error) {
	var st StoreStats
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err == nil && rec.State == packLive {
				st.Packs++
				st.PackBytes += int64(rec.Size)
			}
			return err
		})
	})
	if err != nil {
		return st, err
	}
	st.IndexBytes = s.idx.bytes()
	if fi, err := os.Stat(filepath.Join(s.dir, "index.db")); err == nil {
		st.IndexBytes += fi.Size()
	}
	err = s.idx.forEach(context.Background(), func(e *indexEntry) error {
		st.Chunks++
		st.StoredBytes += int64(e.Loc.Share())
		return nil
	})
	return st, err
}

// ForEach calls fn for every indexed chunk, in id order, inside one
// consistent view of the index.
func (s *Store) ForEach(fn func(ID, Location) error) error {
	return s.idx.forEach(context.Background(), func(e *indexEntry) error {
		return fn(e.ID, e.Loc)
	})
}

// entryKey names a chunk within a pack: its offset, and its slot in a frame.
func entryKey(off uint32, slot uint8) uint64 { return uint64(off)<<8 | uint64(slot) }

// lastFrame decodes a pack's entries in footer order, decoding each zstd
// frame once for all the chunks it holds.
type lastFrame struct {
	off uint32
	raw []byte
	err error
}

func (l *lastFrame) decode(e Entry, stored, dst []byte) ([]byte, error) {
	if e.Codec != CodecZstd {
		return decode(e, stored, dst)
	}
	if l.off != e.Offset {
		l.off = e.Offset
		l.raw, l.err = decodeFrame(stored, int(e.Frame))
		if l.err == nil && e.Slot >= e.Frame {
			l.err = fmt.Errorf("frame slot %d of %d", e.Slot, e.Frame)
		}
	}
	if l.err != nil {
		return nil, l.err
	}
	if len(l.raw) < (int(e.Slot)+1)*ChunkSize {
		return nil, fmt.Errorf("frame slot %d beyond its %d bytes", e.Slot, len(l.raw))
	}
	return l.raw[int(e.Slot)*ChunkSize : (int(e.Slot)+1)*ChunkSize], nil
}
