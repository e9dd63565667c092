package snapshotter

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// MapReader reads one block map of a snapshot. It is safe for concurrent use.
type MapReader struct {
	store *cas.Store
	info  MapInfo
	t     *table
}

// OpenMap returns a reader of map m of snapshot snap.
func (g *Graph) OpenMap(snap, m string) (*MapReader, error) {
	s, err := g.Get(snap)
	if err != nil {
		return nil, err
	}
	info, ok := s.Map(m)
	if !ok {
		return nil, fmt.Errorf("snapshot %q has no %q map: %w", snap, m, errdefs.ErrNotFound)
	}
	t, err := g.resolve(s, m)
	if err != nil {
		return nil, err
	}
	return &MapReader{store: g.store, info: info, t: t}, nil
}

// Info describes the map.
func (r *MapReader) Info() MapInfo { return r.info }

// Size is the map's logical size in bytes.
func (r *MapReader) Size() int64 { return r.info.Size }

// Blocks is the number of blocks the size spans.
func (r *MapReader) Blocks() uint64 { return blocksOf(r.info.Size) }

// Block returns the chunk id of block n (cas.ZeroID for a zero block).
func (r *MapReader) Block(n uint64) cas.ID { return r.t.get(n) }

// ReadBlock reads block n into buf (ChunkSize bytes) and returns it.
func (r *MapReader) ReadBlock(n uint64, buf []byte) ([]byte, error) {
	return r.store.Get(r.t.get(n), buf)
}

// Each calls fn for every non-zero block below the size, in order.
func (r *MapReader) Each(fn func(n uint64, id cas.ID) error) error { return r.t.each(fn) }

// ReadAt implements io.ReaderAt over the image.
func (r *MapReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("negative offset: %w", errdefs.ErrInvalidArgument)
	}
	var buf [cas.ChunkSize]byte
	n := 0
	for n < len(p) {
		pos := off + int64(n)
		if pos >= r.info.Size {
			return n, io.EOF
		}
		chunk, err := r.ReadBlock(uint64(pos/cas.ChunkSize), buf[:])
		if err != nil {
			return n, err
		}
		within := pos % cas.ChunkSize
		avail := min(cas.ChunkSize-within, r.info.Size-pos)
		n += copy(p[n:], chunk[within:within+avail])
	}
	return n, nil
}

// Export writes the map to the file out, byte for byte, with zero blocks left
// as holes. It writes to a temporary file beside out and renames it into
// place, so out is never half-written. progress, when not nil, is called with
// the bytes done so far.
func (r *MapReader) Export(ctx context.Context, out string, progress func(done int64)) error {
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".*.tmp")
	if err != nil {
		return fmt.Errorf("creating %s: %w", out, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Truncate(r.info.Size); err != nil {
		return fmt.Errorf("sizing %s: %w", out, err)
	}
	if err := r.writeBlocks(ctx, f, progress); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", out, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("renaming into %s: %w", out, err)
	}
	ok = true
	return nil
}

// ExportInto writes the map's non-zero blocks into f, an open file of the
// map's size whose other bytes are already zero (a fresh, sparse file),
// each at its offset. Unlike Export it writes in place: a process that maps
// f sees the blocks arrive.
func (r *MapReader) ExportInto(ctx context.Context, f *os.File, progress func(done int64)) error {
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("exporting into %s: %w", f.Name(), err)
	}
	if fi.Size() != r.info.Size {
		return fmt.Errorf("exporting %d bytes into %s, of %d bytes: %w", r.info.Size, f.Name(), fi.Size(), errdefs.ErrInvalidArgument)
	}
	return r.writeBlocks(ctx, f, progress)
}

// writeBlocks reads the non-zero blocks in parallel and writes each at its
// offset.
func (r *MapReader) writeBlocks(ctx context.Context, f *os.File, progress func(int64)) error {
	const run = 256 // blocks per work item
	type item struct{ first uint64 }
	work := make(chan item, 4)
	var done atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var failed atomic.Bool
	fail := func(err error) { errOnce.Do(func() { firstErr = err; failed.Store(true) }) }
	var wg sync.WaitGroup
	nblocks := r.Blocks()
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			buf := make([]byte, run*cas.ChunkSize)
			ids := make([]cas.ID, run)
			for it := range work {
				if failed.Load() {
					continue
				}
				end := min(it.first+run, nblocks)
				ids := ids[:end-it.first]
				for n := it.first; n < end; n++ {
					ids[n-it.first] = r.t.get(n)
				}
				if err := r.store.GetMany(ids, buf); err != nil {
					fail(fmt.Errorf("blocks %d-%d: %w", it.first, end-1, err))
					continue
				}
				// Write maximal runs of non-zero blocks with one pwrite.
				start := -1
				flush := func(upto uint64) error {
					if start < 0 {
						return nil
					}
					lo := uint64(start)
					off := int64(lo) * cas.ChunkSize
					size := min(int64(upto-lo)*cas.ChunkSize, r.info.Size-off)
					b := buf[(lo-it.first)*cas.ChunkSize:][:size]
					start = -1
					if _, err := f.WriteAt(b, off); err != nil {
						return fmt.Errorf("writing export: %w", err)
					}
					return nil
				}
				for n := it.first; n < end; n++ {
					if ids[n-it.first] == cas.ZeroID {
						if err := flush(n); err != nil {
							fail(err)
							break
						}
						continue
					}
					if start < 0 {
						start = int(n)
					}
				}
				if err := flush(end); err != nil {
					fail(err)
				}
				d := done.Add(int64(end-it.first) * cas.ChunkSize)
				if progress != nil {
					progress(min(d, r.info.Size))
				}
			}
		})
	}
	for first := uint64(0); first < nblocks; first += run {
		if ctx.Err() != nil {
			fail(ctx.Err())
			break
		}
		if p := first >> pageShift; p >= uint64(len(r.t.pages)) || r.t.pages[p] == nil {
			// A whole absent page is a hole; skip it cheaply.
			if first&(pageLen-1) == 0 {
				d := done.Add(min(int64(pageLen), int64(nblocks-first)) * cas.ChunkSize)
				if progress != nil {
					progress(min(d, r.info.Size))
				}
				first += pageLen - run
				continue
			}
		}
		work <- item{first}
	}
	close(work)
	wg.Wait()
	return firstErr
}
