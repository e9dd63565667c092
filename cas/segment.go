package cas

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"sync/atomic"

	"github.com/containerd/errdefs"
)

// Index segment file format, version 2 (all integers little-endian):
//
//	header   16 bytes  "BOXDISEG" | version u32 | fence bits u32
//	entries  n × 45 bytes, sorted by id and then by pack, no two alike:
//	           id [32] | pack u32 | offset u32 |
//	           slot << 24 | codec << 20 | stored (u32) | frame u8
//	fence    (1<<bits)+1 × u32: fence[b] is the first entry whose id's top
//	         bits are b or more; fence[1<<bits] is n
//	packs    p × 8 bytes, by increasing pack: pack u32 | its entries here u32
//	trailer  24 bytes  n u32 | p u32 | crc32c(all bytes before it) u32 |
//	                   reserved u32 (0) | "BOXDIEND"
//
// An entry holds the whole id, so a lookup never confuses two chunks that
// share a prefix (a false "stored" would make a Writer skip a chunk). Its
// location is the footer entry's, less the raw length (always ChunkSize):
// a chunk of a zstd frame names the frame's offset and whole stored length
// (under 255 chunks' worth, so 20 bits), its slot in the frame and the
// frame's chunk count; for other codecs slot and frame are 0. Version 1
// had no slot or frame and 13 bits of stored length; Open rebuilds such a
// segment from the pack footers. The fence table, about one slot per 8 to
// 16 entries, turns a lookup into one read of the table and a binary search
// over a few neighbouring entries, without reading the rest of a large
// segment. The parser checks all of it, checksum, order and bounds, so a
// damaged segment is refused whole and rebuilt from the pack footers.
const (
	segVersion     = 2
	segHeaderSize  = 16
	segEntrySize   = 45
	segPackSize    = 8
	segTrailerSize = 24
	// maxFenceBits bounds the fence table (2^28 slots: 4 billion entries).
	maxFenceBits = 28
	// storedBits is how many low bits of an entry's location word hold the
	// stored length; codecBits above them hold the codec, and the top 8 the
	// slot in a frame.
	storedBits = 20
	codecBits  = 4
)

var (
	segMagic    = [8]byte{'B', 'O', 'X', 'D', 'I', 'S', 'E', 'G'}
	segEndMagic = [8]byte{'B', 'O', 'X', 'D', 'I', 'E', 'N', 'D'}
)

// indexEntry is one chunk's location, as a segment lists it.
type indexEntry struct {
	ID  ID
	Loc Location
}

// compareEntries orders entries as a segment lists them: by id, then pack.
func compareEntries(a, b *indexEntry) int {
	if x, y := binary.BigEndian.Uint64(a.ID[:8]), binary.BigEndian.Uint64(b.ID[:8]); x != y {
		return cmp.Compare(x, y)
	}
	if c := bytes.Compare(a.ID[8:], b.ID[8:]); c != 0 {
		return c
	}
	return cmp.Compare(a.Loc.Pack, b.Loc.Pack)
}

// fenceBitsFor sizes the fence table for n entries: 8 to 16 entries a slot.
func fenceBitsFor(n int) uint32 {
	bits := uint32(0)
	for bits < maxFenceBits && uint64(n) >= 16<<bits {
		bits++
	}
	return bits
}

// fenceSlot is the slot of the fence table that id falls in.
func fenceSlot(id []byte, bits uint32) uint32 {
	return binary.BigEndian.Uint32(id[:4]) >> (32 - bits)
}

func putSegEntry(b []byte, e *indexEntry) {
	copy(b[:32], e.ID[:])
	binary.LittleEndian.PutUint32(b[32:], e.Loc.Pack)
	binary.LittleEndian.PutUint32(b[36:], e.Loc.Offset)
	binary.LittleEndian.PutUint32(b[40:], uint32(e.Loc.Slot)<<(storedBits+codecBits)|uint32(e.Loc.Codec)<<storedBits|e.Loc.Stored)
	b[44] = e.Loc.Frame
}

// segLocation decodes the location part of an encoded entry.
func segLocation(b []byte) Location {
	v := binary.LittleEndian.Uint32(b[40:44])
	return Location{
		Pack:   binary.LittleEndian.Uint32(b[32:]),
		Offset: binary.LittleEndian.Uint32(b[36:]),
		Stored: v & (1<<storedBits - 1),
		Codec:  Codec(v >> storedBits & (1<<codecBits - 1)),
		Slot:   uint8(v >> (storedBits + codecBits)),
		Frame:  b[44],
	}
}

// segment is one parsed index segment, usually a read-only mapping of its
// file. Its bytes never change; it is unmapped when the last reader lets go.
type segment struct {
	data    []byte // the whole file
	entries []byte
	fence   []byte
	n       int
	bits    uint32
	packs   []uint32 // increasing
	counts  []uint32 // entries of packs[i]

	seq   uint64 // from the file name; later segments have larger ones
	path  string
	unmap func([]byte) error // nil when data is not a mapping

	// refs counts the index's hold and every view's; at zero, data is unmapped.
	refs atomic.Int32
}

// parseSegment checks a whole segment file and returns it parsed. Any
// inconsistency is an errdefs.ErrDataLoss error: nothing of a damaged segment
// is trusted.
func parseSegment(b []byte) (*segment, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("index segment: "+format+": %w", append(args, errdefs.ErrDataLoss)...)
	}
	size := uint64(len(b))
	if size < segHeaderSize+segTrailerSize {
		return nil, bad("%d bytes, too short", size)
	}
	if [8]byte(b[:8]) != segMagic {
		return nil, bad("header magic missing")
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != segVersion {
		return nil, bad("version %d not supported", v)
	}
	tr := b[size-segTrailerSize:]
	if [8]byte(tr[16:24]) != segEndMagic {
		return nil, bad("trailer magic missing")
	}
	if crc32.Checksum(b[:size-segTrailerSize+8], castagnoli) != binary.LittleEndian.Uint32(tr[8:]) {
		return nil, bad("checksum mismatch")
	}
	if binary.LittleEndian.Uint32(tr[12:]) != 0 {
		return nil, bad("reserved trailer field set")
	}
	bits := binary.LittleEndian.Uint32(b[12:])
	n := uint64(binary.LittleEndian.Uint32(tr[0:]))
	p := uint64(binary.LittleEndian.Uint32(tr[4:]))
	if bits > maxFenceBits {
		return nil, bad("fence of %d bits", bits)
	}
	fenceLen := (uint64(1)<<bits + 1) * 4
	if size != segHeaderSize+n*segEntrySize+fenceLen+p*segPackSize+segTrailerSize {
		return nil, bad("%d bytes do not hold %d entries, %d packs and a %d-bit fence", size, n, p, bits)
	}
	if p == 0 || n == 0 {
		return nil, bad("empty")
	}
	g := &segment{data: b, n: int(n), bits: bits}
	g.entries = b[segHeaderSize : segHeaderSize+n*segEntrySize]
	g.fence = b[segHeaderSize+n*segEntrySize : segHeaderSize+n*segEntrySize+fenceLen]
	packs := b[segHeaderSize+n*segEntrySize+fenceLen : size-segTrailerSize]
	g.packs, g.counts = make([]uint32, p), make([]uint32, p)
	var sum uint64
	for i := range g.packs {
		g.packs[i] = binary.LittleEndian.Uint32(packs[i*segPackSize:])
		g.counts[i] = binary.LittleEndian.Uint32(packs[i*segPackSize+4:])
		if i > 0 && g.packs[i] <= g.packs[i-1] {
			return nil, bad("pack list out of order at %d", i)
		}
		if g.counts[i] == 0 {
			return nil, bad("pack %d listed with no entry", g.packs[i])
		}
		sum += uint64(g.counts[i])
	}
	if sum != n {
		return nil, bad("pack list counts %d entries, the segment holds %d", sum, n)
	}
	if err := g.checkEntries(); err != nil {
		return nil, err
	}
	return g, nil
}

// checkEntries checks the entries' order, locations, packs and fence.
func (g *segment) checkEntries() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("index segment: "+format+": %w", append(args, errdefs.ErrDataLoss)...)
	}
	seen := make([]uint32, len(g.packs))
	slot := g.packSlots()
	slots := uint32(1) << g.bits
	if g.fenceAt(0) != 0 || g.fenceAt(slots) != uint32(g.n) {
		return bad("fence does not span the entries")
	}
	fence := uint32(0)
	var prev []byte
	for i := range g.n {
		b := g.entries[i*segEntrySize : (i+1)*segEntrySize]
		if prev != nil && !entryBefore(prev, b) {
			return bad("entry %d out of order", i)
		}
		prev = b
		// Entry.check's rules, inline on the encoded word for the common
		// case: this loop is most of Open's time.
		pack, off := binary.LittleEndian.Uint32(b[32:]), binary.LittleEndian.Uint32(b[36:])
		w := binary.LittleEndian.Uint32(b[40:44])
		stored, codec := w&(1<<storedBits-1), w>>storedBits
		if codec > uint32(CodecS2) || b[44] != 0 || stored == 0 || stored > ChunkSize || codec == uint32(CodecRaw) && stored != ChunkSize ||
			off < packHeaderSize || uint64(off)+uint64(stored) > maxPackSize {
			// A chunk of a frame, or damage: the whole check.
			if err := segLocation(b).entry().check(maxPackSize); err != nil {
				return fmt.Errorf("index segment entry %d: %w", i, err)
			}
		}
		k, ok := slot(pack)
		if !ok {
			return bad("entry %d in pack %d, which the segment does not list", i, pack)
		}
		seen[k]++
		s := fenceSlot(b, g.bits)
		for fence < s {
			fence++
			if g.fenceAt(fence) != uint32(i) {
				return bad("fence slot %d is %d, want %d", fence, g.fenceAt(fence), i)
			}
		}
	}
	for fence < slots {
		fence++
		if g.fenceAt(fence) != uint32(g.n) {
			return bad("fence slot %d is %d past the last entry", fence, g.fenceAt(fence))
		}
	}
	for k := range seen {
		if seen[k] != g.counts[k] {
			return bad("pack %d has %d entries, the list says %d", g.packs[k], seen[k], g.counts[k])
		}
	}
	return nil
}

// entryBefore reports whether encoded entry a sorts strictly before b.
func entryBefore(a, b []byte) bool {
	if x, y := binary.BigEndian.Uint64(a), binary.BigEndian.Uint64(b); x != y {
		return x < y
	}
	if c := bytes.Compare(a[8:32], b[8:32]); c != 0 {
		return c < 0
	}
	return binary.LittleEndian.Uint32(a[32:]) < binary.LittleEndian.Uint32(b[32:])
}

// packSlots returns a function from a pack number to its place in the
// segment's pack list: a table when the numbers are dense, as they are.
func (g *segment) packSlots() func(uint32) (int, bool) {
	lo, hi := g.packs[0], g.packs[len(g.packs)-1]
	if span := uint64(hi-lo) + 1; span > 4*uint64(len(g.packs))+4096 {
		return g.packIndex
	}
	table := make([]int32, hi-lo+1)
	for i := range table {
		table[i] = -1
	}
	for k, p := range g.packs {
		table[p-lo] = int32(k)
	}
	return func(p uint32) (int, bool) {
		if p < lo || p > hi || table[p-lo] < 0 {
			return 0, false
		}
		return int(table[p-lo]), true
	}
}

func (g *segment) fenceAt(slot uint32) uint32 {
	return binary.LittleEndian.Uint32(g.fence[slot*4:])
}

// packIndex finds pack in the segment's pack list.
func (g *segment) packIndex(pack uint32) (int, bool) {
	lo, hi := 0, len(g.packs)
	for lo < hi {
		mid := int(uint(lo+hi) >> 1)
		if g.packs[mid] < pack {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	return lo, lo < len(g.packs) && g.packs[lo] == pack
}

// search returns the first entry whose id is id or greater. Ids are
// uniform, so the bits after the fence slot's say about where in the slot
// id falls: the search starts there and steps to the answer, usually
// within the cache line it started on.
func (g *segment) search(id *ID) int {
	slot := fenceSlot(id[:], g.bits)
	lo, hi := int(g.fenceAt(slot)), int(g.fenceAt(slot+1))
	if lo == hi {
		return lo
	}
	want := binary.BigEndian.Uint64(id[:8])
	i := lo + int(uint64(hi-lo)*((want<<g.bits)>>32)>>32)
	if g.before(i, want, id) {
		for i++; i < hi && g.before(i, want, id); i++ {
		}
		return i
	}
	for i > lo && !g.before(i-1, want, id) {
		i--
	}
	return i
}

// before reports whether entry i sorts before id, whose first 8 bytes are want.
func (g *segment) before(i int, want uint64, id *ID) bool {
	e := g.entries[i*segEntrySize : i*segEntrySize+32]
	have := binary.BigEndian.Uint64(e)
	return have < want || have == want && bytes.Compare(e[8:], id[8:]) < 0
}

// idAt reports whether entry i exists and is for id.
func (g *segment) idAt(i int, id *ID) bool {
	return i < g.n && [32]byte(g.entries[i*segEntrySize:i*segEntrySize+32]) == *id
}

// entry decodes entry i.
func (g *segment) entry(i int) indexEntry {
	b := g.entries[i*segEntrySize : (i+1)*segEntrySize]
	return indexEntry{ID: ID(b[:32]), Loc: segLocation(b)}
}

// hold takes a reference for a reader.
func (g *segment) hold() { g.refs.Add(1) }

// release drops a reference; the last one unmaps the segment.
func (g *segment) release() {
	if g.refs.Add(-1) == 0 && g.unmap != nil {
		_ = g.unmap(g.data)
		g.data, g.entries, g.fence = nil, nil, nil
	}
}

// fileSize is the segment's size on disk.
func (g *segment) fileSize() int64 { return int64(len(g.data)) }

// segmentName is the file name of the segment with sequence number seq.
func segmentName(seq uint64) string { return fmt.Sprintf("seg-%016x.idx", seq) }

// parseSegmentName returns the sequence number in a segment's file name.
func parseSegmentName(name string) (uint64, bool) {
	var seq uint64
	if _, err := fmt.Sscanf(name, "seg-%016x.idx", &seq); err != nil || name != segmentName(seq) {
		return 0, false
	}
	return seq, true
}

// removeFile removes path, ignoring a file already gone.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}
