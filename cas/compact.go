package cas

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// Compaction rewrites the packs a Writer sealed, whose chunks are s2
// compressed one by one (fast to write), into packs of zstd frames of many
// chunks each (slower to write, much smaller). An ingest is thus durable at
// s2's speed and small once compaction has run, off its path.

// DefaultFrameChunks is how many chunks a zstd frame holds unless told
// otherwise: frames of about 1 MiB compress about as well as a whole pack,
// and reading one chunk decodes its frame (cached for the next).
const DefaultFrameChunks = MaxFrameChunks

// compactStepPacks is how many packs one step compacts before it switches
// the index to the new packs and removes the old: a long compaction keeps
// its gains as it goes, and its memory bounded.
const compactStepPacks = 8

// CompactOptions tune a compaction.
type CompactOptions struct {
	// FrameChunks is the most chunks one zstd frame holds, 1 to
	// MaxFrameChunks; zero means DefaultFrameChunks.
	FrameChunks int
	// Workers is how many goroutines check and compress; zero means
	// GOMAXPROCS.
	Workers int
	// MaxPacks bounds how many packs this call compacts; zero means all.
	MaxPacks int
	// Keep, when set, names chunks to leave out of frames, stored one by
	// one as they were: chunks read first and in no particular order, such
	// as the working sets a lazy resume pushes ahead, which would otherwise
	// decode a whole frame for each. They still move to the new packs.
	Keep func(ID) bool
}

// CompactStats says what a compaction did.
type CompactStats struct {
	PacksCompacted int     `json:"packs_compacted"`
	PacksWritten   int     `json:"packs_written"`
	PacksSkipped   int     `json:"packs_skipped"`
	PacksLeft      int     `json:"packs_left"`
	ChunksMoved    int64   `json:"chunks_moved"`
	ChunksDropped  int64   `json:"chunks_dropped"`
	Frames         int64   `json:"frames"`
	ChunksKept     int64   `json:"chunks_kept"` // left out of frames (CompactOptions.Keep)
	BytesBefore    int64   `json:"bytes_before"`
	BytesAfter     int64   `json:"bytes_after"`
	Seconds        float64 `json:"seconds"`
	// Skipped names the packs left as they were, and why (damage).
	Skipped []string `json:"skipped,omitempty"`
}

// compactStop, when set (by tests), is called after each phase of a step;
// an error stops the compaction there, as a crash would.
var compactStop func(phase string) error

// Compact rewrites the packs not yet compacted, oldest first, into packs of
// zstd frames. Every chunk is decoded and checked against its id before it
// moves, so damage is never copied; a pack holding a damaged chunk is left
// as it is and named in the stats. Each step follows GC's write order: the
// new packs are sealed (fsynced, renamed, folder fsynced), then one index
// transaction points the moved chunks at them and marks the old packs for
// deletion, then the old files go. A crash at any point leaves every
// committed chunk readable: before the switch the index names only the old
// packs (the next Open indexes the new ones as duplicates, which GC
// removes); after it, only the new ones, and Open finishes the deletions.
func (s *Store) Compact(ctx context.Context, opts CompactOptions) (CompactStats, error) {
	w := s.NewWriter()
	defer w.Abort()
	return w.Compact(ctx, opts)
}

// Compact is Store.Compact run by the holder of the write lock.
func (w *Writer) Compact(ctx context.Context, opts CompactOptions) (CompactStats, error) {
	start := time.Now()
	if opts.FrameChunks <= 0 || opts.FrameChunks > MaxFrameChunks {
		opts.FrameChunks = DefaultFrameChunks
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	var st CompactStats
	todo, err := w.s.uncompacted()
	if err != nil {
		return st, err
	}
	if opts.MaxPacks > 0 && len(todo) > opts.MaxPacks {
		st.PacksLeft = len(todo) - opts.MaxPacks
		todo = todo[:opts.MaxPacks]
	}
	for len(todo) > 0 {
		n := min(len(todo), compactStepPacks)
		if err := w.s.compactStep(ctx, todo[:n], opts, &st); err != nil {
			st.PacksLeft += len(todo)
			st.Seconds = time.Since(start).Seconds()
			return st, fmt.Errorf("compact: %w", err)
		}
		todo = todo[n:]
	}
	st.Seconds = time.Since(start).Seconds()
	return st, nil
}

// uncompacted lists the live packs compaction has not written, oldest
// first.
func (s *Store) uncompacted() ([]PackInfo, error) {
	var live []PackInfo
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err != nil || len(k) != 4 {
				return fmt.Errorf("pack record %x: %w", k, errdefs.ErrDataLoss)
			}
			if rec.State == packLive {
				live = append(live, PackInfo{Num: beUint32(k), Size: int64(rec.Size), Chunks: rec.Chunks})
			}
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	var out []PackInfo
	for _, p := range live {
		// A pack whose ends cannot be read is tried, and reported as
		// damaged by the step that reads it.
		flags, err := s.packFlags(p.Num)
		if err != nil || flags&packCompacted == 0 {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b PackInfo) int { return int(a.Num) - int(b.Num) })
	return out, nil
}

// packFlags reads the flags in pack num's header.
func (s *Store) packFlags(num uint32) (uint32, error) {
	flags, _, err := s.packEnds(num)
	return flags, err
}

// packEnds reads the flags in pack num's header and the footer offset in
// its trailer. It opens the file on its own, so that it does not count as
// a read of the pack (PackUses).
func (s *Store) packEnds(num uint32) (flags uint32, footerOff uint64, err error) {
	f, err := os.Open(s.packPath(num))
	if err != nil {
		return 0, 0, fmt.Errorf("opening %s: %w", packName(num), err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, 0, err
	}
	if fi.Size() < packHeaderSize+trailerSize {
		return 0, 0, fmt.Errorf("%s is too short: %w", packName(num), errdefs.ErrDataLoss)
	}
	var hdr [packHeaderSize]byte
	var tr [trailerSize]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return 0, 0, fmt.Errorf("reading %s: %w", packName(num), err)
	}
	if _, err := f.ReadAt(tr[:], fi.Size()-trailerSize); err != nil {
		return 0, 0, fmt.Errorf("reading %s: %w", packName(num), err)
	}
	footerOff = binary.LittleEndian.Uint64(tr[0:])
	if footerOff < packHeaderSize || footerOff > uint64(fi.Size())-trailerSize {
		return 0, 0, fmt.Errorf("%s: footer offset %d out of range: %w", packName(num), footerOff, errdefs.ErrDataLoss)
	}
	return binary.LittleEndian.Uint32(hdr[12:]), footerOff, nil
}

// compactStep compacts packs, then switches the index and removes them.
// One goroutine reads, checks and encodes the next pack while this one
// writes the last.
func (s *Store) compactStep(ctx context.Context, packs []PackInfo, opts CompactOptions, st *CompactStats) error {
	run := &gcRun{s: s, victims: map[uint32]bool{}}
	defer run.abortUnsealed()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var before int64
	for pr := range s.prepareCompaction(ctx, packs, opts) {
		if err := pr.err; err != nil {
			if !errors.Is(err, errdefs.ErrDataLoss) {
				return err
			}
			st.PacksSkipped++
			st.Skipped = append(st.Skipped, fmt.Sprintf("%s: %v", packName(pr.pack.Num), err))
			continue
		}
		if err := run.writeItems(pr.items, st); err != nil {
			return err
		}
		run.victims[pr.pack.Num] = true
		before += pr.pack.Size
		st.ChunksDropped += pr.dropped
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := run.sealCurrent(); err != nil {
		return err
	}
	if len(run.victims) == 0 {
		return nil
	}
	phases := []struct {
		name string
		do   func() error
	}{
		{"sealed", func() error { return nil }},
		{"switched", run.switchIndex},
		{"removed", run.removeVictims},
		{"forgotten", run.forgetVictims},
	}
	for _, ph := range phases {
		if err := ph.do(); err != nil {
			return err
		}
		if compactStop != nil {
			if err := compactStop(ph.name); err != nil {
				return err
			}
		}
	}
	st.PacksCompacted += len(run.victims)
	st.PacksWritten += len(run.sealed)
	st.ChunksMoved += int64(len(run.moves))
	st.BytesBefore += before
	for _, sz := range run.sizes {
		st.BytesAfter += sz
	}
	return nil
}

// preparedPack is a pack read, checked and encoded, ready to write.
type preparedPack struct {
	pack    PackInfo
	items   []*compactItem
	dropped int64
	err     error
}

// prepareCompaction reads, checks and encodes packs in order, one ahead of
// the reader of the channel it returns, until ctx ends.
func (s *Store) prepareCompaction(ctx context.Context, packs []PackInfo, opts CompactOptions) <-chan preparedPack {
	out := make(chan preparedPack)
	go func() {
		defer close(out)
		for _, p := range packs {
			if ctx.Err() != nil {
				return
			}
			items, dropped, err := s.compactItems(p.Num, opts)
			if err == nil {
				err = checkAndEncode(items, opts.Workers)
			}
			select {
			case out <- preparedPack{p, items, dropped, err}:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out
}

// compactItem is what one unit of a compacted pack becomes: a zstd frame
// of chunks, or one chunk kept as it was stored (raw ones, which did not
// compress, and those of a frame that would not shrink).
type compactItem struct {
	src    []Entry  // the chunks, as the old pack's footer lists them
	stored [][]byte // their stored bytes in the old pack
	frame  []byte   // the zstd frame, once encoded; nil keeps src as stored
	keep   bool     // one chunk CompactOptions.Keep names: never framed
}

// compactItems reads pack num and groups the chunks the index places in it
// into items, in pack order. dropped counts the copies the index places
// elsewhere (garbage, left behind).
func (s *Store) compactItems(num uint32, opts CompactOptions) ([]*compactItem, int64, error) {
	f, err := s.file(num)
	if err != nil {
		return nil, 0, err
	}
	entries, size, err := readFooter(f)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", packName(num), err)
	}
	data := make([]byte, size)
	if _, err := f.ReadAt(data, 0); err != nil {
		return nil, 0, fmt.Errorf("reading %s: %w", packName(num), err)
	}
	ids := make([]ID, len(entries))
	for i, e := range entries {
		ids[i] = e.ID
	}
	locs, found := s.idx.owners(ids)
	var items []*compactItem
	var open *compactItem
	var dropped int64
	for i, e := range entries {
		if !found[i] || locs[i] != locationOf(num, e) {
			dropped++
			continue
		}
		stored := data[e.Offset : e.Offset+e.Stored]
		if opts.Keep != nil && opts.Keep(e.ID) {
			items = append(items, &compactItem{src: []Entry{e}, stored: [][]byte{stored}, keep: true})
			continue
		}
		if open == nil || len(open.src) == opts.FrameChunks {
			open = &compactItem{}
			items = append(items, open)
		}
		open.src = append(open.src, e)
		open.stored = append(open.stored, stored)
	}
	return items, dropped, nil
}

// checkAndEncode decodes and checks every chunk of items, and encodes the
// frames, on workers goroutines. It returns the first damage found.
func checkAndEncode(items []*compactItem, workers int) error {
	var next atomic.Int64
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for k := range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(items) || errs[k] != nil {
					return
				}
				errs[k] = items[i].encode()
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// encode checks the item's chunks and, for more than a raw chunk, builds
// its frame, keeping it only when it is smaller than the chunks as stored.
func (it *compactItem) encode() error {
	raw := make([]byte, len(it.src)*ChunkSize)
	var was int
	for i, e := range it.src {
		out, err := decode(e, it.stored[i], raw[i*ChunkSize:(i+1)*ChunkSize])
		if err == nil && sha256.Sum256(out) != e.ID {
			err = errors.New("content does not match its id")
		}
		if err != nil {
			return fmt.Errorf("chunk %s at offset %d is damaged: %w: %w", e.ID, e.Offset, err, errdefs.ErrDataLoss)
		}
		was += len(it.stored[i])
	}
	if it.keep {
		return nil
	}
	frame, err := encodeFrame(raw, nil)
	if err != nil {
		return err
	}
	if len(frame) < was {
		it.frame = frame
	}
	return nil
}

// writeItems appends items to the new packs, in order, sealing each at
// PackTarget, and notes where every chunk moves.
func (r *gcRun) writeItems(items []*compactItem, st *CompactStats) error {
	for _, it := range items {
		if err := r.startPack(packCompacted); err != nil {
			return err
		}
		if it.keep {
			st.ChunksKept++
		}
		if it.frame != nil {
			ids := make([]ID, len(it.src))
			for i, e := range it.src {
				ids[i] = e.ID
			}
			entries, err := r.cur.addFrame(ids, it.frame)
			if err != nil {
				return err
			}
			for _, e := range entries {
				r.moves = append(r.moves, movedChunk{e.ID, locationOf(r.cur.num, e)})
			}
			st.Frames++
		} else {
			for i, e := range it.src {
				ne, err := r.cur.add(e.ID, it.stored[i], e.Codec)
				if err != nil {
					return err
				}
				r.moves = append(r.moves, movedChunk{e.ID, locationOf(r.cur.num, ne)})
			}
		}
		if r.cur.size() >= PackTarget {
			if err := r.sealCurrent(); err != nil {
				return err
			}
		}
	}
	return nil
}

// startPack begins a new pack with flags unless one is being written.
func (r *gcRun) startPack(flags uint32) error {
	if r.cur != nil {
		return nil
	}
	s := r.s
	s.filesMu.Lock()
	num := s.nextPack
	s.nextPack++
	s.filesMu.Unlock()
	p, err := newPackWriterFlags(s.packsDir, num, flags)
	if err != nil {
		return err
	}
	r.cur = p
	return nil
}
