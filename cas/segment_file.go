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
	packs map[uint32]uint32
	buf   [segEntrySize]byte
}

// newSegWriter starts a segment in dir for about expect entries (which
// sizes the fence table; fewer or more are fine).
func newSegWriter(dir string, expect int) (*segWriter, error) {
	f, err := os.CreateTemp(dir, "seg-*.tmp")
	if err != nil {
		return nil, wrapIO("creating index segment", err)
	}
	w := &segWriter{dir: dir, f: f, bw: bufio.NewWriterSize(f, 1<<20), crc: crc32.New(castagnoli), packs: map[uint32]uint32{}}
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
	if e.Loc.Stored >= 1<<storedBits || e.Loc.Codec >= 1<<(16-storedBits) {
		return fmt.Errorf("index segment entry %s: stored %d, codec %d do not fit: %w", e.ID, e.Loc.Stored, e.Loc.Codec, errdefs.ErrInvalidArgument)
	}
	for s := fenceSlot(e.ID[:], w.bits); w.slot <= s; w.slot++ {
		w.fence[w.slot] = uint32(w.n)
	}
	putSegEntry(w.buf[:], e)
	if err := w.write(w.buf[:]); err != nil {
		return err
	}
	w.last = *e
	w.n++
	w.packs[e.Loc.Pack]++
	return nil
}

// finish completes the segment as dir/name and returns it opened. With no
// entry, it writes nothing and returns nil.
func (w *segWriter) finish(name string) (*segment, error) {
	if w.n == 0 {
		w.abort()
		return nil, nil
	}
	for ; w.slot < uint32(len(w.fence)); w.slot++ {
		w.fence[w.slot] = uint32(w.n)
	}
	tail := make([]byte, 0, len(w.fence)*4+len(w.packs)*segPackSize+segTrailerSize)
	for _, v := range w.fence {
		tail = binary.LittleEndian.AppendUint32(tail, v)
	}
	for _, p := range slices.Sorted(maps.Keys(w.packs)) {
		tail = binary.LittleEndian.AppendUint32(tail, p)
		tail = binary.LittleEndian.AppendUint32(tail, w.packs[p])
	}
	tail = binary.LittleEndian.AppendUint32(tail, uint32(w.n))
	tail = binary.LittleEndian.AppendUint32(tail, uint32(len(w.packs)))
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
