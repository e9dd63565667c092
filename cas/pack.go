package cas

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

// Pack file format, versions 1 and 2 (all integers little-endian):
//
//	header   16 bytes  "BOXDPACK" | version u32 | flags u32
//	chunks   the stored bytes of each chunk, back to back
//	footer   count × 48-byte entries:
//	           id [32] | offset u32 | stored u32 | raw u32 | codec u8 |
//	           slot u8 | frame u8 | reserved u8
//	trailer  32 bytes  footer offset u64 | count u32 | crc32c(footer) u32 |
//	                   version u32 | crc32c(previous 20 bytes) u32 | "BOXDPEND"
//
// The trailer sits at a fixed place (the last 32 bytes), so a reader finds the
// footer without scanning, and the two checksums tell a torn or damaged footer
// from a good one. Chunk bytes carry no checksum of their own: the chunk id is
// the SHA-256 of the raw bytes, and every read checks it.
//
// A chunk stored with [CodecZstd] shares a zstd frame with up to 254 others:
// its entry's offset and stored length are the frame's, frame is how many
// chunks the frame holds and slot is this chunk's place among them. Other
// codecs store one chunk each, with slot and frame 0. Flags bit 0
// ([packCompacted]) marks a pack written by compaction; readers need not
// look at it. Such a pack is version 2: its footer is packed (see
// packFooter), and the footer offset in the trailer says where it begins.
const (
	packVersion = 1
	// packVersionPacked is a pack whose footer is packed (see packFooter).
	packVersionPacked = 2
	packHeaderSize    = 16
	entrySize         = 48
	trailerSize       = 32
	// PackTarget is the size at which a pack is sealed and a new one begun.
	PackTarget = 32 << 20
	// maxPackSize bounds offsets to what a u32 can address.
	maxPackSize = 1<<32 - 1
	// MaxFrameChunks is the most chunks one zstd frame holds.
	MaxFrameChunks = 255
	// packCompacted is the header flag of a pack that compaction wrote.
	packCompacted = 1
)

var (
	packMagic    = [8]byte{'B', 'O', 'X', 'D', 'P', 'A', 'C', 'K'}
	trailerMagic = [8]byte{'B', 'O', 'X', 'D', 'P', 'E', 'N', 'D'}
	castagnoli   = crc32.MakeTable(crc32.Castagnoli)
)

// Codec says how a chunk's bytes are stored.
type Codec uint8

// Codecs.
const (
	CodecRaw Codec = 0 // stored as is
	CodecS2  Codec = 1 // klauspost/compress s2 block format
	// CodecZstd is a zstd frame of one or more chunks back to back.
	CodecZstd Codec = 2
)

func (c Codec) String() string {
	switch c {
	case CodecRaw:
		return "raw"
	case CodecS2:
		return "s2"
	case CodecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec(%d)", uint8(c))
}

// Entry describes one chunk in a pack, as listed in the pack's footer.
type Entry struct {
	ID     ID
	Offset uint32
	Stored uint32 // bytes in the pack
	Raw    uint32 // bytes once decoded
	Codec  Codec
	Slot   uint8 // the chunk's place in its zstd frame
	Frame  uint8 // chunks in its zstd frame; 0 for other codecs
}

func (e Entry) marshal(b []byte) {
	copy(b[:32], e.ID[:])
	binary.LittleEndian.PutUint32(b[32:], e.Offset)
	binary.LittleEndian.PutUint32(b[36:], e.Stored)
	binary.LittleEndian.PutUint32(b[40:], e.Raw)
	b[44] = byte(e.Codec)
	b[45], b[46], b[47] = e.Slot, e.Frame, 0
}

// DecodeFooter parses a pack's footer and trailer from its last bytes. tail
// must end where the pack ends; size is the pack's total size. It checks both
// checksums and that every entry lies inside the chunk area.
func DecodeFooter(tail []byte, size int64) ([]Entry, error) {
	if len(tail) < trailerSize || size < packHeaderSize+trailerSize {
		return nil, fmt.Errorf("pack too short for a trailer: %w", errdefs.ErrDataLoss)
	}
	tr := tail[len(tail)-trailerSize:]
	if [8]byte(tr[24:32]) != trailerMagic {
		return nil, fmt.Errorf("pack trailer magic missing: %w", errdefs.ErrDataLoss)
	}
	if crc32.Checksum(tr[:20], castagnoli) != binary.LittleEndian.Uint32(tr[20:]) {
		return nil, fmt.Errorf("pack trailer checksum mismatch: %w", errdefs.ErrDataLoss)
	}
	footerOff := binary.LittleEndian.Uint64(tr[0:])
	count := uint64(binary.LittleEndian.Uint32(tr[8:]))
	footerCRC := binary.LittleEndian.Uint32(tr[12:])
	version := binary.LittleEndian.Uint32(tr[16:])
	if version != packVersion && version != packVersionPacked {
		return nil, fmt.Errorf("pack version %d not supported: %w", version, errdefs.ErrDataLoss)
	}
	// Compare without wrapping: a huge footerOff plus the footer's size
	// must not overflow to the pack's size.
	need := count*entrySize + trailerSize
	if version == packVersionPacked {
		if footerOff < packHeaderSize || footerOff > uint64(size)-trailerSize {
			return nil, fmt.Errorf("pack footer offset %d does not fit a %d-byte pack: %w", footerOff, size, errdefs.ErrDataLoss)
		}
		need = uint64(size) - footerOff
	}
	if footerOff < packHeaderSize || need > uint64(size) || footerOff != uint64(size)-need {
		return nil, fmt.Errorf("pack footer offset %d with %d entries does not fit a %d-byte pack: %w", footerOff, count, size, errdefs.ErrDataLoss)
	}
	if uint64(len(tail)) < need {
		return nil, fmt.Errorf("pack footer needs %d bytes, have %d: %w", need, len(tail), errdefs.ErrDataLoss)
	}
	footer := tail[uint64(len(tail))-need : uint64(len(tail))-trailerSize]
	if crc32.Checksum(footer, castagnoli) != footerCRC {
		return nil, fmt.Errorf("pack footer checksum mismatch: %w", errdefs.ErrDataLoss)
	}
	if version == packVersionPacked {
		var err error
		if footer, err = unpackFooter(footer, count); err != nil {
			return nil, fmt.Errorf("pack footer: %w: %w", err, errdefs.ErrDataLoss)
		}
	}
	entries := make([]Entry, count)
	for i := range entries {
		b := footer[i*entrySize : (i+1)*entrySize]
		e := Entry{
			ID:     ID(b[:32]),
			Offset: binary.LittleEndian.Uint32(b[32:]),
			Stored: binary.LittleEndian.Uint32(b[36:]),
			Raw:    binary.LittleEndian.Uint32(b[40:]),
			Codec:  Codec(b[44]),
			Slot:   b[45],
			Frame:  b[46],
		}
		if err := e.check(footerOff); err != nil {
			return nil, fmt.Errorf("pack footer entry %d: %w", i, err)
		}
		entries[i] = e
	}
	return entries, nil
}

// check validates an entry against the end of a pack's chunk area.
func (e Entry) check(chunkEnd uint64) error {
	if e.Codec == CodecZstd {
		return e.checkFrame(chunkEnd)
	}
	switch {
	case e.Codec != CodecRaw && e.Codec != CodecS2:
		return fmt.Errorf("unknown codec %d: %w", e.Codec, errdefs.ErrDataLoss)
	case e.Raw == 0 || e.Raw > ChunkSize:
		return fmt.Errorf("raw length %d out of range: %w", e.Raw, errdefs.ErrDataLoss)
	case e.Slot != 0 || e.Frame != 0:
		return fmt.Errorf("%s chunk with frame slot %d of %d: %w", e.Codec, e.Slot, e.Frame, errdefs.ErrDataLoss)
	case e.Stored == 0 || e.Stored > e.Raw || (e.Codec == CodecRaw && e.Stored != e.Raw):
		return fmt.Errorf("stored length %d does not fit raw length %d: %w", e.Stored, e.Raw, errdefs.ErrDataLoss)
	case uint64(e.Offset) < packHeaderSize || uint64(e.Offset)+uint64(e.Stored) > chunkEnd:
		return fmt.Errorf("chunk at %d+%d lies outside the chunk area: %w", e.Offset, e.Stored, errdefs.ErrDataLoss)
	}
	return nil
}

// checkFrame validates the entry of a chunk in a zstd frame: a frame is
// smaller than the chunks it holds, or it would not have been written.
func (e Entry) checkFrame(chunkEnd uint64) error {
	switch {
	case e.Raw != ChunkSize:
		return fmt.Errorf("raw length %d of a framed chunk: %w", e.Raw, errdefs.ErrDataLoss)
	case e.Frame == 0 || e.Slot >= e.Frame:
		return fmt.Errorf("frame slot %d of %d: %w", e.Slot, e.Frame, errdefs.ErrDataLoss)
	case e.Stored == 0 || e.Stored >= uint32(e.Frame)*ChunkSize:
		return fmt.Errorf("frame of %d bytes for %d chunks: %w", e.Stored, e.Frame, errdefs.ErrDataLoss)
	case uint64(e.Offset) < packHeaderSize || uint64(e.Offset)+uint64(e.Stored) > chunkEnd:
		return fmt.Errorf("frame at %d+%d lies outside the chunk area: %w", e.Offset, e.Stored, errdefs.ErrDataLoss)
	}
	return nil
}

// readFooter reads and decodes the footer of the pack file f.
func readFooter(f *os.File) ([]Entry, int64, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	size := fi.Size()
	if size < packHeaderSize+trailerSize {
		return nil, size, fmt.Errorf("pack is %d bytes, too short: %w", size, errdefs.ErrDataLoss)
	}
	var tr [trailerSize]byte
	if _, err := f.ReadAt(tr[:], size-trailerSize); err != nil {
		return nil, size, err
	}
	// The footer runs from its offset to the trailer, whatever its version.
	need := size - int64(min(binary.LittleEndian.Uint64(tr[0:]), uint64(size)))
	if need > size-packHeaderSize || need < trailerSize {
		// Let DecodeFooter name the damage.
		_, err := DecodeFooter(tr[:], size)
		if err == nil {
			err = fmt.Errorf("pack footer larger than the pack: %w", errdefs.ErrDataLoss)
		}
		return nil, size, err
	}
	tail := make([]byte, need)
	if _, err := f.ReadAt(tail, size-need); err != nil {
		return nil, size, err
	}
	var hdr [packHeaderSize]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return nil, size, err
	}
	if [8]byte(hdr[:8]) != packMagic {
		return nil, size, fmt.Errorf("pack header magic missing: %w", errdefs.ErrDataLoss)
	}
	entries, err := DecodeFooter(tail, size)
	return entries, size, err
}

// packWriter appends chunks to a temporary pack file and seals it.
type packWriter struct {
	dir     string
	num     uint32
	flags   uint32
	f       *os.File
	bw      *bufio.Writer
	file    earlyWriter // what bw writes to: f
	off     uint32
	entries []Entry
}

// earlyWriter writes to a pack file and, every writebackStep bytes, asks
// the kernel to start writing them to disk. By the time the pack is sealed,
// most of it is on disk already, so its fsync waits less: which matters most
// for the last pack of a write, whose fsync nothing overlaps.
type earlyWriter struct {
	f       *os.File
	written int64 // bytes written to f
	started int64 // bytes whose writeback has been started
}

// writebackStep is how many bytes a pack writes between requests to start
// writing them back.
const writebackStep = 4 << 20

func (e *earlyWriter) Write(p []byte) (int, error) {
	n, err := e.f.Write(p)
	e.written += int64(n)
	if e.written-e.started >= writebackStep {
		startWriteback(e.f.Fd(), e.started, e.written-e.started)
		e.started = e.written
	}
	return n, err
}

func packName(num uint32) string { return fmt.Sprintf("pack-%08x.pack", num) }

func newPackWriter(dir string, num uint32) (*packWriter, error) {
	return newPackWriterFlags(dir, num, 0)
}

// newPackWriterFlags begins a pack whose header carries flags.
func newPackWriterFlags(dir string, num, flags uint32) (*packWriter, error) {
	f, err := os.CreateTemp(dir, packName(num)+".*.tmp")
	if err != nil {
		return nil, wrapIO("creating pack", err)
	}
	w := &packWriter{dir: dir, num: num, flags: flags, f: f, off: packHeaderSize}
	w.bw = bufio.NewWriterSize(&w.file, 1<<20)
	w.file.f = f
	var hdr [packHeaderSize]byte
	copy(hdr[:], packMagic[:])
	version := uint32(packVersion)
	if flags&packCompacted != 0 {
		version = packVersionPacked
	}
	binary.LittleEndian.PutUint32(hdr[8:], version)
	binary.LittleEndian.PutUint32(hdr[12:], flags)
	if _, err := w.bw.Write(hdr[:]); err != nil {
		w.abort()
		return nil, wrapIO("writing pack header", err)
	}
	return w, nil
}

// size is what the pack would be if sealed now.
func (w *packWriter) size() int64 {
	return int64(w.off) + int64(len(w.entries))*entrySize + trailerSize
}

func (w *packWriter) add(id ID, stored []byte, codec Codec) (Entry, error) {
	e := Entry{ID: id, Offset: w.off, Stored: uint32(len(stored)), Raw: ChunkSize, Codec: codec}
	if _, err := w.bw.Write(stored); err != nil {
		return e, wrapIO("writing pack", err)
	}
	w.off += uint32(len(stored))
	w.entries = append(w.entries, e)
	return e, nil
}

// addFrame appends a zstd frame holding the chunks ids, in order.
func (w *packWriter) addFrame(ids []ID, frame []byte) ([]Entry, error) {
	if len(ids) == 0 || len(ids) > MaxFrameChunks {
		return nil, fmt.Errorf("frame of %d chunks: %w", len(ids), errdefs.ErrInvalidArgument)
	}
	if _, err := w.bw.Write(frame); err != nil {
		return nil, wrapIO("writing pack", err)
	}
	first := len(w.entries)
	for i, id := range ids {
		w.entries = append(w.entries, Entry{ID: id, Offset: w.off, Stored: uint32(len(frame)), Raw: ChunkSize, Codec: CodecZstd, Slot: uint8(i), Frame: uint8(len(ids))})
	}
	w.off += uint32(len(frame))
	return w.entries[first:], nil
}

// seal writes the footer, syncs and renames the pack into place, and syncs
// the folder. It returns the final path and size.
func (w *packWriter) seal() (string, int64, error) {
	footer := make([]byte, len(w.entries)*entrySize)
	for i, e := range w.entries {
		e.marshal(footer[i*entrySize:])
	}
	version := uint32(packVersion)
	if w.flags&packCompacted != 0 {
		var err error
		if footer, err = packFooter(footer); err != nil {
			w.abort()
			return "", 0, err
		}
		version = packVersionPacked
	}
	var tr [trailerSize]byte
	binary.LittleEndian.PutUint64(tr[0:], uint64(w.off))
	binary.LittleEndian.PutUint32(tr[8:], uint32(len(w.entries)))
	binary.LittleEndian.PutUint32(tr[12:], crc32.Checksum(footer, castagnoli))
	binary.LittleEndian.PutUint32(tr[16:], version)
	binary.LittleEndian.PutUint32(tr[20:], crc32.Checksum(tr[:20], castagnoli))
	copy(tr[24:], trailerMagic[:])
	size := int64(w.off) + int64(len(footer)) + trailerSize
	for _, b := range [][]byte{footer, tr[:]} {
		if _, err := w.bw.Write(b); err != nil {
			w.abort()
			return "", 0, wrapIO("writing pack footer", err)
		}
	}
	if err := w.bw.Flush(); err != nil {
		w.abort()
		return "", 0, wrapIO("writing pack", err)
	}
	if err := w.f.Sync(); err != nil {
		w.abort()
		return "", 0, wrapIO("syncing pack", err)
	}
	tmp := w.f.Name()
	if err := w.f.Close(); err != nil {
		_ = os.Remove(tmp)
		return "", 0, wrapIO("closing pack", err)
	}
	final := filepath.Join(w.dir, packName(w.num))
	if err := os.Rename(tmp, final); err != nil {
		_ = os.Remove(tmp)
		return "", 0, wrapIO("sealing pack", err)
	}
	if err := syncDir(w.dir); err != nil {
		return "", 0, wrapIO("syncing pack folder", err)
	}
	return final, size, nil
}

func (w *packWriter) abort() {
	if w.f != nil {
		name := w.f.Name()
		_ = w.f.Close()
		_ = os.Remove(name)
		w.f = nil
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// wrapIO adds context to an I/O error and categorises a full disk.
func wrapIO(what string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%s: %w", what, errcat.With(err, errdefs.ErrResourceExhausted))
	}
	if errors.Is(err, io.ErrShortWrite) {
		return fmt.Errorf("%s: short write: %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}
