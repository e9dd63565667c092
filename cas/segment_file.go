package cas

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// segWriter writes a segment file from entries given in order. It writes a
// temporary file and, on finish, syncs it, renames it into place and syncs
// the folder, as packs are sealed: a crash leaves the old file or the new
// one, never half of one.
type segWriter struct {
	dir   string
	f     *os.File
	bw    *bufio.Writer
	crc   hash.Hash32
	bits  uint32
	fence []uint32
	slot  uint32 // the next fence slot to fill
	n     int
	last  indexEntry
	packs packCounter
	buf   []byte // entries not yet written
}

// flushBuf writes the gathered entries.
func (w *segWriter) flushBuf() error {
	err := w.write(w.buf)
	w.buf = w.buf[:0]
	return err
}

// newSegWriter starts a segment in dir for about expect entries (which
// sizes the fence table; fewer or more are fine).
func newSegWriter(dir string, expect int) (*segWriter, error) {
	f, err := os.CreateTemp(dir, "seg-*.tmp")
	if err != nil {
		return nil, wrapIO("creating index segment", err)
	}
	w := &segWriter{dir: dir, f: f, bw: bufio.NewWriterSize(f, 1<<20), crc: crc32.New(castagnoli), buf: make([]byte, 0, 1560*segEntrySize)}
	w.bits = fenceBitsFor(expect)
	w.fence = make([]uint32, 1<<w.bits+1)
	var hdr [segHeaderSize]byte
	copy(hdr[:], segMagic[:])
	binary.LittleEndian.PutUint32(hdr[8:], segVersion)
	binary.LittleEndian.PutUint32(hdr[12:], w.bits)
	if err := w.write(hdr[:]); err != nil {
		w.abort()
		return nil, err
	}
	return w, nil
}

func (w *segWriter) write(b []byte) error {
	_, _ = w.crc.Write(b)
	if _, err := w.bw.Write(b); err != nil {
		return wrapIO("writing index segment", err)
	}
	return nil
}

// add appends an entry, which must sort after the previous one.
func (w *segWriter) add(e *indexEntry) error {
	if w.n > 0 && compareEntries(&w.last, e) >= 0 {
		return fmt.Errorf("index segment entry %s in pack %d out of order: %w", e.ID, e.Loc.Pack, errdefs.ErrInvalidArgument)
	}
	if e.Loc.Stored >= 1<<storedBits || e.Loc.Codec >= 1<<codecBits {
		return fmt.Errorf("index segment entry %s: stored %d, codec %d do not fit: %w", e.ID, e.Loc.Stored, e.Loc.Codec, errdefs.ErrInvalidArgument)
	}
	for s := fenceSlot(e.ID[:], w.bits); w.slot <= s; w.slot++ {
		w.fence[w.slot] = uint32(w.n)
	}
	// Entries gather in buf and go to the checksum and the file together.
	if len(w.buf)+segEntrySize > cap(w.buf) {
		if err := w.flushBuf(); err != nil {
			return err
		}
	}
	w.buf = w.buf[:len(w.buf)+segEntrySize]
	putSegEntry(w.buf[len(w.buf)-segEntrySize:], e)
	w.last = *e
	w.n++
	w.packs.add(e.Loc.Pack)
	return nil
}

// finish completes the segment as dir/name and returns it opened. With no
// entry, it writes nothing and returns nil.
func (w *segWriter) finish(name string) (*segment, error) {
	if w.n == 0 {
		w.abort()
		return nil, nil
	}
	if err := w.flushBuf(); err != nil {
		w.abort()
		return nil, err
	}
	for ; w.slot < uint32(len(w.fence)); w.slot++ {
		w.fence[w.slot] = uint32(w.n)
	}
	tail := make([]byte, 0, len(w.fence)*4+segTrailerSize)
	for _, v := range w.fence {
		tail = binary.LittleEndian.AppendUint32(tail, v)
	}
	packs := w.packs.sorted()
	for _, p := range packs {
		tail = binary.LittleEndian.AppendUint32(tail, p.pack)
		tail = binary.LittleEndian.AppendUint32(tail, p.n)
	}
	tail = binary.LittleEndian.AppendUint32(tail, uint32(w.n))
	tail = binary.LittleEndian.AppendUint32(tail, uint32(len(packs)))
	if err := w.write(tail); err != nil {
		w.abort()
		return nil, err
	}
	var tr [segTrailerSize - 8]byte
	binary.LittleEndian.PutUint32(tr[0:], w.crc.Sum32())
	copy(tr[8:], segEndMagic[:])
	if _, err := w.bw.Write(tr[:]); err != nil {
		w.abort()
		return nil, wrapIO("writing index segment", err)
	}
	if err := w.bw.Flush(); err != nil {
		w.abort()
		return nil, wrapIO("writing index segment", err)
	}
	if err := w.f.Sync(); err != nil {
		w.abort()
		return nil, wrapIO("syncing index segment", err)
	}
	tmp := w.f.Name()
	if err := w.f.Close(); err != nil {
		_ = os.Remove(tmp)
		return nil, wrapIO("closing index segment", err)
	}
	w.f = nil
	final := filepath.Join(w.dir, name)
	if err := os.Rename(tmp, final); err != nil {
		_ = os.Remove(tmp)
		return nil, wrapIO("installing index segment", err)
	}
	if err := syncDir(w.dir); err != nil {
		return nil, wrapIO("syncing index folder", err)
	}
	return openSegment(final)
}

// abort removes the unfinished file.
func (w *segWriter) abort() {
	if w.f != nil {
		name := w.f.Name()
		_ = w.f.Close()
		_ = os.Remove(name)
		w.f = nil
	}
}

// openSegment maps and parses the segment file at path.
func openSegment(path string) (*segment, error) {
	seq, ok := parseSegmentName(filepath.Base(path))
	if !ok {
		return nil, fmt.Errorf("%s is not an index segment name: %w", path, errdefs.ErrInvalidArgument)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening index segment: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening index segment: %w", err)
	}
	if fi.Size() < segHeaderSize+segTrailerSize || fi.Size() > 1<<46 {
		return nil, fmt.Errorf("index segment %s of %d bytes: %w", filepath.Base(path), fi.Size(), errdefs.ErrDataLoss)
	}
	data, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping index segment %s: %w", filepath.Base(path), err)
	}
	g, err := parseSegment(data)
	if err != nil {
		_ = unix.Munmap(data)
		return nil, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	g.seq, g.path, g.unmap = seq, path, unix.Munmap
	g.refs.Store(1)
	return g, nil
}

// packCounter counts entries by pack: in a slice while the pack numbers
// are dense, as a store's are, and in a map past that.
type packCounter struct {
	base   uint32
	counts []uint32 // counts[p-base]
	sparse map[uint32]uint32
}

// maxDensePacks bounds the span of pack numbers counted in the slice.
const maxDensePacks = 1 << 20

func (c *packCounter) add(p uint32) {
	if c.sparse != nil {
		c.sparse[p]++
		return
	}
	if c.counts == nil {
		c.base, c.counts = p, make([]uint32, 1, 64)
	}
	end := uint64(c.base) + uint64(len(c.counts))
	lo, hi := min(uint64(c.base), uint64(p)), max(end, uint64(p)+1)
	switch {
	case hi-lo > maxDensePacks:
		c.sparse = map[uint32]uint32{}
		for i, n := range c.counts {
			if n > 0 {
				c.sparse[c.base+uint32(i)] = n
			}
		}
		c.counts = nil
		c.sparse[p]++
		return
	case lo < uint64(c.base):
		// Leave room below too, so packs that come in falling order
		// copy the counts a few times only.
		if slack := min(lo, uint64(len(c.counts))); hi-(lo-slack) <= maxDensePacks {
			lo -= slack
		}
		grown := make([]uint32, hi-lo)
		copy(grown[uint64(c.base)-lo:], c.counts)
		c.base, c.counts = uint32(lo), grown
	case hi > end:
		c.counts = append(c.counts, make([]uint32, hi-end)...)
	}
	c.counts[p-c.base]++
}

// packCount is one pack's count.
type packCount struct{ pack, n uint32 }

// sorted returns the packs counted, by increasing number.
func (c *packCounter) sorted() []packCount {
	var out []packCount
	if c.sparse != nil {
		for _, p := range slices.Sorted(maps.Keys(c.sparse)) {
			out = append(out, packCount{p, c.sparse[p]})
		}
		return out
	}
	for i, n := range c.counts {
		if n > 0 {
			out = append(out, packCount{c.base + uint32(i), n})
		}
	}
	return out
}
