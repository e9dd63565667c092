package cas

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// source feeds WriteStream batches of chunks.
type source interface {
	// fill points b.data at up to batchChunks chunks (a short last chunk
	// zero-padded) and returns the bytes of input they hold; 0 at the end.
	fill(b *batch) (int, error)
	// release says the collector is done with b's bytes.
	release(b *batch)
	close()
}

// newSource maps r when it is a regular file, so that chunks are hashed and
// compressed straight from the page cache, and reads it otherwise.
func newSource(r io.Reader) source {
	if f, ok := r.(*os.File); ok {
		if m := mapFile(f); m != nil {
			return m
		}
	}
	return &readSource{r: r}
}

// readSource copies the input into each batch's buffer.
type readSource struct{ r io.Reader }

func (s *readSource) fill(b *batch) (int, error) {
	n, err := io.ReadFull(s.r, b.room())
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = nil
	}
	b.n = (n + ChunkSize - 1) / ChunkSize
	b.holes = 0
	clear(b.buf[n : b.n*ChunkSize])
	b.data = b.buf[:b.n*ChunkSize]
	return n, err
}

func (s *readSource) release(*batch) {}
func (s *readSource) close()         {}

// mappedSource reads a regular file through a read-only shared mapping.
// Batches point into the mapping; once collected, their pages are dropped
// from this process (MADV_DONTNEED), so the mapping never holds more than the
// batches in flight and RSS stays bounded whatever the file's size.
//
// Chunks that lie wholly in a hole of a sparse file are marked as such and
// never read: the file system says where its data is (see dataExtent).
type mappedSource struct {
	f    *os.File
	m    []byte
	off  int
	base int64 // file offset of m[0]
	// sparse is whether dataExtent answers for this file; [dataStart,
	// dataEnd) is the data extent found last, in file offsets.
	sparse             bool
	dataStart, dataEnd int64
}

// mapFile maps f from its current offset to its end, or returns nil when it
// cannot (not a regular file, an unaligned offset, an empty rest).
func mapFile(f *os.File) *mappedSource {
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	pos, err := f.Seek(0, io.SeekCurrent)
	if err != nil || pos%int64(os.Getpagesize()) != 0 || fi.Size() <= pos || fi.Size()-pos > 1<<46 {
		return nil
	}
	m, err := unix.Mmap(int(f.Fd()), pos, int(fi.Size()-pos), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil
	}
	_ = unix.Madvise(m, unix.MADV_SEQUENTIAL)
	return &mappedSource{f: f, m: m, base: pos, sparse: true}
}

func (s *mappedSource) fill(b *batch) (int, error) {
	n := min(len(s.m)-s.off, batchChunks*ChunkSize)
	if n == 0 {
		return 0, nil
	}
	b.n = (n + ChunkSize - 1) / ChunkSize
	s.markHoles(b, s.base+int64(s.off))
	if n%ChunkSize == 0 {
		b.data = s.m[s.off : s.off+n]
	} else {
		copy(b.room(), s.m[s.off:s.off+n])
		clear(b.buf[n : b.n*ChunkSize])
		b.data = b.buf[:b.n*ChunkSize]
	}
	b.mapped = s.m[s.off : s.off+n]
	s.off += n
	return n, nil
}

// markHoles marks the chunks of b, which starts at file offset pos, that no
// data extent touches. A short last chunk counts as a hole when its part of
// the file is one: the rest of it is padding.
func (s *mappedSource) markHoles(b *batch, pos int64) {
	b.holes = 0
	for i := 0; i < b.n && s.sparse; i++ {
		q := pos + int64(i)*ChunkSize
		if q >= s.dataEnd {
			start, end, ok := dataExtent(int(s.f.Fd()), q)
			if !ok {
				s.sparse = false
				break
			}
			s.dataStart, s.dataEnd = start, end
		}
		// dataEnd > q here, so the chunk is a hole only when the next
		// data begins at or after its end.
		hole := q+ChunkSize <= s.dataStart
		b.hole[i] = hole
		if hole {
			b.holes++
		}
	}
}

func (s *mappedSource) release(b *batch) {
	if len(b.mapped) > 0 {
		// Whole pages only: the batch starts page-aligned and holds whole
		// chunks but for the file's tail.
		_ = unix.Madvise(b.mapped, unix.MADV_DONTNEED)
		b.mapped = nil
	}
}

func (s *mappedSource) close() {
	_ = unix.Munmap(s.m)
	// Leave the file where a reader of it would be.
	_, _ = s.f.Seek(s.base+int64(s.off), io.SeekStart)
}
