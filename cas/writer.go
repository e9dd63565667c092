package cas

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/s2"
)

// WriteStats counts what a Writer did with the chunks it was given.
type WriteStats struct {
	Chunks      int64 // chunks offered, zero ones included
	ZeroChunks  int64 // all-zero chunks (never stored)
	HoleChunks  int64 // of ZeroChunks, those in holes of a sparse file (never read)
	NewChunks   int64 // chunks stored for the first time
	NewStored   int64 // bytes those took in packs
	ReusedChunk int64 // chunks already in the store (deduplicated)
	Packs       int   // packs sealed
}

// Writer adds chunks to the store. It holds the store's write lock from
// NewWriter until Commit or Abort, so GC never sweeps chunks it has written
// and a caller has yet to reference. After an error the Writer is broken:
// every later call returns that error, and only Abort is useful.
type Writer struct {
	s     *Store
	pack  *packWriter
	stats WriteStats
	// pending holds the ids in packs not yet indexed; sealGen counts packs
	// indexed, so a batch looked up before one was knows to look again.
	pending map[ID]struct{}
	sealGen uint64
	// sealing delivers the results of the seals in flight, oldest first.
	sealing []chan sealResult
	broken  error
	done    bool
	// Workers is the number of goroutines hashing and compressing.
	Workers int
	// raw, while set (StoreRaw), stores new chunks uncompressed.
	raw bool
	// spare holds batches for reuse.
	spare chan *batch
}

// NewWriter waits for the write lock and returns a Writer.
func (s *Store) NewWriter() *Writer {
	s.writeMu.Lock()
	return &Writer{s: s, pending: map[ID]struct{}{}, Workers: runtime.GOMAXPROCS(0), spare: make(chan *batch, 32)}
}

// Stats returns the counts so far.
func (w *Writer) Stats() WriteStats { return w.stats }

// StoreRaw sets whether the chunks that Put and WriteStream store from now on
// are kept uncompressed, for data that is read back page by page where
// decoding would cost more than the bytes it saves: a restore's page faults
// each wait for their chunk. Compact compresses them later like any other.
// Chunks already in the store stay as they are.
func (w *Writer) StoreRaw(on bool) { w.raw = on }

// Put stores one chunk (shorter chunks are zero-padded) and returns its id.
func (w *Writer) Put(chunk []byte) (ID, error) {
	if err := w.usable(); err != nil {
		return ID{}, err
	}
	var ids [1]ID
	b := &batch{n: 1, buf: make([]byte, ChunkSize), ids: ids[:], raw: w.raw}
	copy(b.buf, chunk)
	b.data = b.buf
	w.process(b)
	if err := w.collect(b); err != nil {
		return ID{}, err
	}
	return b.ids[0], nil
}

// batchChunks is how many chunks travel through the pipeline together.
const batchChunks = 256

// chunk classes within a batch.
const (
	classZero = iota
	classKnown
	classNew
)

type batch struct {
	buf    []byte // room for batchChunks chunks, made when first needed
	data   []byte // the batch's n chunks, back to back: buf, or a mapped file
	mapped []byte // the part of a mapped file data came from
	n      int
	ids    []ID
	// hole marks the chunks that lie in holes of a sparse input, valid
	// when holes (their number) is not 0.
	hole  [batchChunks]bool
	holes int
	raw   bool // store new chunks uncompressed
	class [batchChunks]uint8
	codec [batchChunks]Codec
	comp  [batchChunks][]byte // stored bytes of new chunks
	gen   uint64
	done  chan struct{}
}

func newBatch() *batch {
	b := &batch{ids: make([]ID, batchChunks)}
	for i := range b.comp {
		b.comp[i] = make([]byte, 0, s2.MaxEncodedLen(ChunkSize))
	}
	return b
}

// room returns b's buffer for batchChunks chunks. A batch of a mapped file
// needs none but for the file's short tail.
func (b *batch) room() []byte {
	if b.buf == nil {
		b.buf = make([]byte, batchChunks*ChunkSize)
	}
	return b.buf
}

// getBatch returns a spare batch, or a new one. The Writer keeps its spares
// (rather than a sync.Pool, which each GC empties) so a long ingest
// allocates its few megabytes of batches once.
func (w *Writer) getBatch() *batch {
	select {
	case b := <-w.spare:
		return b
	default:
		return newBatch()
	}
}

func (w *Writer) putBatch(b *batch) {
	select {
	case w.spare <- b:
	default:
	}
}

// WriteStream cuts r into chunks and stores them, using Workers goroutines
// to hash and compress. For chunk i (in order, from 0) it calls emit with
// the chunk's id; a short last chunk is zero-padded. It returns the number of
// bytes read. Memory stays bounded: a few batches of 1 MiB are in flight.
func (w *Writer) WriteStream(ctx context.Context, r io.Reader, emit func(i int64, id ID) error) (int64, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	workers := max(w.Workers, 1)
	work := make(chan *batch, workers)
	order := make(chan *batch, lookahead(workers))
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for b := range work {
				w.process(b)
				close(b.done)
			}
		})
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var total int64
	var readErr, stopErr error
	raw := w.raw
	src := newSource(r)
	defer src.close()
	go func() {
		defer close(order)
		defer close(work)
		for {
			if err := ctx.Err(); err != nil {
				stopErr = err // stopped before the end of r
				return
			}
			b := w.getBatch()
			n, err := src.fill(b)
			if n == 0 {
				w.putBatch(b)
				readErr = err
				return
			}
			total += int64(n)
			b.raw = raw
			b.done = make(chan struct{})
			order <- b
			work <- b
			if err != nil {
				readErr = err
				return
			}
		}
	}()
	var idx int64
	var err error
	for b := range order {
		<-b.done
		if err == nil {
			err = ctx.Err()
		}
		if err == nil {
			err = w.collect(b)
		}
		for i := 0; err == nil && i < b.n; i++ {
			err = emit(idx, b.ids[i])
			idx++
		}
		if err != nil {
			cancel()
		}
		src.release(b)
		w.putBatch(b)
	}
	wg.Wait()
	if err == nil && readErr != nil {
		err = fmt.Errorf("reading input: %w", readErr)
	}
	if err == nil {
		err = stopErr
	}
	return total, err
}

// lookahead is how many batches may wait to be collected, in order, behind
// the oldest. The workers take batches in order but finish them in any, and
// a worker that is slow on the oldest batch (descheduled, say, on a busy
// host) holds up the collector: the others go on with the batches behind it
// as long as there is room. Batches of a mapped file hold no copy of their
// chunks, so the room costs little memory.
func lookahead(workers int) int { return min(8*workers, 24) }

// process hashes a batch, looks its chunks up in the index and compresses
// the new ones. It runs on a worker goroutine.
func (w *Writer) process(b *batch) {
	w.s.filesMu.RLock()
	b.gen = w.sealGen
	w.s.filesMu.RUnlock()
	// Chunks that hold data are hashed two at a time (sum2).
	pending := -1
	for i := 0; i < b.n; i++ {
		if b.holes > 0 && b.hole[i] {
			b.ids[i], b.class[i] = ZeroID, classZero
			continue
		}
		c := b.data[i*ChunkSize : (i+1)*ChunkSize]
		if isZeroChunk(c) {
			b.ids[i], b.class[i] = ZeroID, classZero
			continue
		}
		b.class[i] = classNew
		if pending < 0 {
			pending = i
			continue
		}
		b.ids[pending], b.ids[i] = sum2((*[ChunkSize]byte)(b.data[pending*ChunkSize:]), (*[ChunkSize]byte)(c))
		pending = -1
	}
	if pending >= 0 {
		b.ids[pending] = sha256.Sum256(b.data[pending*ChunkSize : (pending+1)*ChunkSize])
	}
	w.s.idx.read(func(find func(*ID) (Location, bool)) {
		for i := 0; i < b.n; i++ {
			if b.class[i] == classNew {
				if _, ok := find(&b.ids[i]); ok {
					b.class[i] = classKnown
				}
			}
		}
	})
	for i := 0; i < b.n; i++ {
		if b.class[i] != classNew {
			continue
		}
		if b.raw {
			b.codec[i] = CodecRaw
			continue
		}
		c := b.data[i*ChunkSize : (i+1)*ChunkSize]
		enc, codec := encodeChunk(c, b.comp[i])
		// comp keeps its own buffer: a raw chunk's bytes are the input's.
		if b.codec[i] = codec; codec == CodecS2 {
			b.comp[i] = enc
		}
	}
}

// encodeChunk compresses one chunk with s2 into dst's room, or says to store
// it raw (returning the chunk itself) when that saves less than an eighth.
func encodeChunk(c, dst []byte) ([]byte, Codec) {
	enc := s2.Encode(dst[:cap(dst)], c)
	if len(enc) > ChunkSize-ChunkSize/8 {
		return c, CodecRaw
	}
	return enc, CodecS2
}

// collect appends a processed batch's new chunks to the pack, in order.
func (w *Writer) collect(b *batch) error {
	if w.broken != nil {
		return w.broken
	}
	for i := 0; i < b.n; i++ {
		w.stats.Chunks++
		switch b.class[i] {
		case classZero:
			w.stats.ZeroChunks++
			if b.holes > 0 && b.hole[i] {
				w.stats.HoleChunks++
			}
			continue
		case classKnown:
			w.stats.ReusedChunk++
			continue
		}
		id := b.ids[i]
		if _, ok := w.pending[id]; ok || (b.gen != w.sealGen && w.s.Has(id)) {
			w.stats.ReusedChunk++
			continue
		}
		stored := b.comp[i]
		if b.codec[i] == CodecRaw {
			stored = b.data[i*ChunkSize : (i+1)*ChunkSize]
		}
		if err := w.add(id, stored, b.codec[i]); err != nil {
			return w.fail(err)
		}
	}
	return nil
}

func (w *Writer) add(id ID, stored []byte, codec Codec) error {
	if w.pack == nil {
		w.s.filesMu.Lock()
		num := w.s.nextPack
		w.s.nextPack++
		w.s.filesMu.Unlock()
		p, err := newPackWriter(w.s.packsDir, num)
		if err != nil {
			return err
		}
		w.pack = p
	}
	if _, err := w.pack.add(id, stored, codec); err != nil {
		return err
	}
	w.pending[id] = struct{}{}
	w.stats.NewChunks++
	w.stats.NewStored += int64(len(stored))
	if w.pack.size() >= PackTarget {
		return w.startSeal()
	}
	return nil
}

// startSeal hands the full pack to a goroutine that seals and indexes it,
// while the Writer fills the next one. At most maxSealing seals are in
// flight, which bounds the ids held in pending.
func (w *Writer) startSeal() error {
	p := w.pack
	if p == nil {
		return nil
	}
	w.pack = nil
	if len(w.sealing) >= maxSealing {
		if err := w.waitSeal(); err != nil {
			p.abort()
			return err
		}
	}
	done := make(chan sealResult, 1)
	w.sealing = append(w.sealing, done)
	go func() { done <- sealResult{p, w.s.sealAndIndex(p)} }()
	return nil
}

// maxSealing is how many packs may be syncing at once.
const maxSealing = 3

type sealResult struct {
	p   *packWriter
	err error
}

// waitSeal waits for the oldest seal in flight, if any, and then forgets
// the ids of that pack: the index answers for them now.
func (w *Writer) waitSeal() error {
	if len(w.sealing) == 0 {
		return nil
	}
	r := <-w.sealing[0]
	w.sealing = w.sealing[1:]
	if r.err != nil {
		return r.err
	}
	w.s.filesMu.Lock()
	w.sealGen++
	w.s.filesMu.Unlock()
	for _, e := range r.p.entries {
		delete(w.pending, e.ID)
	}
	w.stats.Packs++
	return nil
}

// waitSeals waits for every seal in flight and returns the first error.
func (w *Writer) waitSeals() error {
	var first error
	for len(w.sealing) > 0 {
		if err := w.waitSeal(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// sealAndIndex makes a pack durable, then adds its chunks to the index.
func (s *Store) sealAndIndex(p *packWriter) error {
	_, size, err := p.seal()
	if err != nil {
		return err
	}
	err = s.indexPack(p.num, size, p.entries)
	if err != nil {
		// The pack is sealed; the next Open indexes it.
		return wrapIO("indexing "+packName(p.num), err)
	}
	return nil
}

// usable says why the Writer can take no more chunks, if it cannot.
func (w *Writer) usable() error {
	if w.done {
		return fmt.Errorf("writer already committed or aborted: %w", errdefs.ErrFailedPrecondition)
	}
	return w.broken
}

func (w *Writer) fail(err error) error {
	if w.broken == nil {
		w.broken = err
	}
	return w.broken
}

// Seal starts sealing the pack being filled, in the background, and returns
// at once; chunks put after it go to a new pack. A caller with work to do
// before Commit (encoding what refers to the chunks, say) calls it first, so
// that the pack's fsync overlaps that work. Commit waits for the seal as for
// any other, and an error of the seal is Commit's.
func (w *Writer) Seal() error {
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.startSeal(); err != nil {
		return w.fail(err)
	}
	return nil
}

// Commit seals the last pack and releases the write lock. Once it returns
// nil, every chunk the Writer returned an id for is durable and indexed.
func (w *Writer) Commit() error {
	if w.done {
		return errors.New("writer already finished")
	}
	err := w.broken
	if err == nil {
		err = w.startSeal()
	}
	if err2 := w.waitSeals(); err == nil {
		err = err2
	}
	if err != nil {
		w.Abort()
		return err
	}
	w.done = true
	w.s.writeMu.Unlock()
	return nil
}

// Abort drops the unsealed pack and releases the write lock. Chunks in packs
// sealed earlier stay; GC reclaims those nothing references.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	_ = w.waitSeals()
	if w.pack != nil {
		w.pack.abort()
		w.pack = nil
	}
	w.done = true
	w.s.writeMu.Unlock()
}
