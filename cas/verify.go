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
		entries map[uint32]Entry // by offset
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
	footers := map[uint32]map[uint32]Entry{}
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
		e2, ok := f[loc.Offset]
		if !ok || e2.ID != id || e2.Stored != loc.Stored || e2.Codec != loc.Codec {
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
func (s *Store) verifyPack(num uint32) (map[uint32]Entry, []Damage, int64) {
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
	byOffset := make(map[uint32]Entry, len(entries))
	out := make([]byte, ChunkSize)
	for _, e := range entries {
		byOffset[e.Offset] = e
		stored := data[e.Offset : e.Offset+e.Stored]
		raw, err := decode(e.Codec, stored, out)
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
		st.StoredBytes += int64(e.Loc.Stored)
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
