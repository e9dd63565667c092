package cas

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// synthEntries returns n entries with random ids spread over packs of
// perPack entries each, numbered from firstPack, as a pack's footer gives them.
func synthEntries(g *gen, n, perPack int, firstPack uint32) []indexEntry {
	out := make([]indexEntry, n)
	for i := range out {
		_, _ = g.r.Read(out[i].ID[:])
		k := i % perPack
		out[i].Loc = Location{Pack: firstPack + uint32(i/perPack), Offset: packHeaderSize + uint32(k)*2000, Stored: 2000, Codec: CodecS2}
	}
	return out
}

// segmentBytes writes entries as a segment in a temporary folder and returns
// the file's bytes.
func segmentBytes(t testing.TB, entries []indexEntry) []byte {
	t.Helper()
	x := newChunkIndex(t.TempDir())
	g, err := x.writeSegment(entries)
	if err != nil {
		t.Fatal(err)
	}
	defer g.release()
	return bytes.Clone(g.data)
}

func TestSegmentRoundTrip(t *testing.T) {
	g := newGen(70)
	dup := synthEntries(g, 40, 10, 3)
	// The same chunk in two packs: both entries stay, ordered by pack.
	dup[7].ID = dup[33].ID
	tests := []struct {
		name    string
		entries []indexEntry
	}{
		{"one entry", synthEntries(g, 1, 1, 0)},
		{"below the first fence split", synthEntries(g, 15, 4, 9)},
		{"at the first fence split", synthEntries(g, 16, 16, 1)},
		{"many packs", synthEntries(g, 5000, 700, 100)},
		{"a chunk in two packs", dup},
		{"largest pack numbers", synthEntries(g, 30, 10, 1<<32-3)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := map[ID][]Location{}
			for _, e := range tt.entries {
				want[e.ID] = append(want[e.ID], e.Loc)
			}
			b := segmentBytes(t, slices.Clone(tt.entries))
			seg, err := parseSegment(b)
			if err != nil {
				t.Fatal(err)
			}
			if seg.n != len(tt.entries) {
				t.Fatalf("segment holds %d entries, want %d", seg.n, len(tt.entries))
			}
			for id, locs := range want {
				i := seg.search(&id)
				for _, loc := range locs {
					if !seg.idAt(i, &id) {
						t.Fatalf("chunk %s: %d entries found, want %d", id.Short(), i-seg.search(&id), len(locs))
					}
					if got := seg.entry(i).Loc; got != loc {
						t.Fatalf("chunk %s at %+v, want %+v", id.Short(), got, loc)
					}
					i++
				}
				if seg.idAt(i, &id) {
					t.Fatalf("chunk %s listed more than %d times", id.Short(), len(locs))
				}
			}
			for range 100 {
				var id ID
				_, _ = g.r.Read(id[:])
				if seg.idAt(seg.search(&id), &id) {
					t.Fatalf("a random id %s is found", id.Short())
				}
			}
		})
	}
}

// TestParseSegmentEveryByte flips each byte of a small segment in turn:
// the parser must refuse every one.
func TestParseSegmentEveryByte(t *testing.T) {
	b := segmentBytes(t, synthEntries(newGen(71), 20, 8, 5))
	if _, err := parseSegment(b); err != nil {
		t.Fatal(err)
	}
	for off := range b {
		c := bytes.Clone(b)
		c[off] ^= 0x41
		if _, err := parseSegment(c); err == nil {
			t.Errorf("byte %d of %d changed: segment accepted", off, len(b))
		}
	}
	for _, n := range []int{0, 1, segHeaderSize, len(b) - 1} {
		if _, err := parseSegment(b[:n]); err == nil {
			t.Errorf("segment cut to %d bytes accepted", n)
		}
	}
}

// resealSegment rewrites b's checksum, so a test can reach the checks
// behind it.
func resealSegment(b []byte) []byte {
	tr := b[len(b)-segTrailerSize:]
	binary.LittleEndian.PutUint32(tr[8:], crc32.Checksum(b[:len(b)-segTrailerSize+8], castagnoli))
	return b
}

// TestParseSegmentChecks covers the checks a good checksum does not make
// pointless: a writer's bug must not become a trusted index.
func TestParseSegmentChecks(t *testing.T) {
	good := segmentBytes(t, synthEntries(newGen(72), 40, 10, 5))
	fenceOff := segHeaderSize + 40*segEntrySize
	packsOff := len(good) - segTrailerSize - 4*segPackSize
	tests := []struct {
		name  string
		spoil func(b []byte)
	}{
		{"entries swapped", func(b []byte) {
			e0 := bytes.Clone(b[segHeaderSize : segHeaderSize+segEntrySize])
			copy(b[segHeaderSize:], b[segHeaderSize+segEntrySize:segHeaderSize+2*segEntrySize])
			copy(b[segHeaderSize+segEntrySize:], e0)
		}},
		{"entry duplicated", func(b []byte) {
			copy(b[segHeaderSize+segEntrySize:], b[segHeaderSize:segHeaderSize+segEntrySize])
		}},
		{"pack not listed", func(b []byte) { binary.LittleEndian.PutUint32(b[segHeaderSize+32:], 99) }},
		{"stored length zero", func(b []byte) { binary.LittleEndian.PutUint32(b[segHeaderSize+40:], uint32(CodecS2)<<storedBits) }},
		{"unknown codec", func(b []byte) { binary.LittleEndian.PutUint32(b[segHeaderSize+40:], 5<<storedBits|100) }},
		{"slot of an s2 chunk", func(b []byte) {
			binary.LittleEndian.PutUint32(b[segHeaderSize+40:], 1<<24|uint32(CodecS2)<<storedBits|100)
		}},
		{"slot 16 of an s2 chunk", func(b []byte) {
			binary.LittleEndian.PutUint32(b[segHeaderSize+40:], 16<<24|uint32(CodecS2)<<storedBits|100)
		}},
		{"frame of an s2 chunk", func(b []byte) {
			binary.LittleEndian.PutUint32(b[segHeaderSize+40:], uint32(CodecS2)<<storedBits|100)
			b[segHeaderSize+44] = 2
		}},
		{"slot past the frame", func(b []byte) {
			binary.LittleEndian.PutUint32(b[segHeaderSize+40:], 3<<24|uint32(CodecZstd)<<storedBits|9000)
			b[segHeaderSize+44] = 3
		}},
		{"frame larger than its chunks", func(b []byte) {
			binary.LittleEndian.PutUint32(b[segHeaderSize+40:], uint32(CodecZstd)<<storedBits|3*ChunkSize)
			b[segHeaderSize+44] = 3
		}},
		{"offset inside the header", func(b []byte) { binary.LittleEndian.PutUint32(b[segHeaderSize+36:], 3) }},
		{"fence slot moved", func(b []byte) {
			binary.LittleEndian.PutUint32(b[fenceOff+4:], 1+binary.LittleEndian.Uint32(b[fenceOff+4:]))
		}},
		{"fence start", func(b []byte) { binary.LittleEndian.PutUint32(b[fenceOff:], 1) }},
		{"pack count", func(b []byte) { binary.LittleEndian.PutUint32(b[packsOff+4:], 11) }},
		{"packs out of order", func(b []byte) { binary.LittleEndian.PutUint32(b[packsOff+segPackSize:], 1) }},
		{"entry count", func(b []byte) { binary.LittleEndian.PutUint32(b[len(b)-segTrailerSize:], 39) }},
		{"fence bits", func(b []byte) { binary.LittleEndian.PutUint32(b[12:], 40) }},
		{"version", func(b []byte) { binary.LittleEndian.PutUint32(b[8:], 1) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := bytes.Clone(good)
			tt.spoil(b)
			if _, err := parseSegment(resealSegment(b)); err == nil {
				t.Error("segment accepted")
			}
		})
	}
}

// frameEntries makes entries of chunks in zstd frames, at the edges of
// what a location holds, beside a few of other codecs.
func frameEntries(g *gen) []indexEntry {
	var entries []indexEntry
	for i, loc := range []Location{
		{Pack: 1, Offset: packHeaderSize, Stored: 255*ChunkSize - 1, Codec: CodecZstd, Slot: 254, Frame: 255},
		{Pack: 1, Offset: packHeaderSize, Stored: 255*ChunkSize - 1, Codec: CodecZstd, Slot: 0, Frame: 255},
		{Pack: 1, Offset: 1 << 30, Stored: 70000, Codec: CodecZstd, Slot: 17, Frame: 40},
		{Pack: 2, Offset: packHeaderSize, Stored: 10, Codec: CodecZstd, Slot: 0, Frame: 1},
		{Pack: 2, Offset: 1 << 31, Stored: ChunkSize, Codec: CodecRaw},
		{Pack: 3, Offset: maxPackSize - 100, Stored: 100, Codec: CodecS2},
	} {
		var id ID
		_, _ = g.r.Read(id[:])
		entries = append(entries, indexEntry{ID: id, Loc: loc})
		if i == 0 {
			// The same chunk in another pack, as a GC copy would be.
			entries = append(entries, indexEntry{ID: id, Loc: Location{Pack: 3, Offset: packHeaderSize, Stored: 99, Codec: CodecS2}})
		}
	}
	return entries
}

// TestSegmentFrameLocations: a chunk of a zstd frame keeps its whole
// location through a segment: the frame's stored length (past 16 bits), its
// slot and the frame's chunk count.
func TestSegmentFrameLocations(t *testing.T) {
	entries := frameEntries(newGen(74))
	seg, err := parseSegment(segmentBytes(t, entries))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range entries {
		found := false
		for i := seg.search(&want.ID); seg.idAt(i, &want.ID); i++ {
			if got := seg.entry(i); got == want {
				found = true
			}
		}
		if !found {
			t.Errorf("entry %s at %+v not found", want.ID, want.Loc)
		}
	}
}

// FuzzParseSegment: the parser never panics, and a segment it accepts is
// what a writer makes: every entry is found, in order, in a listed pack,
// with a valid location. With reseal, the checksum is made good first, so
// that the checks behind it are fuzzed too.
func FuzzParseSegment(f *testing.F) {
	for i, n := range []int{1, 3, 17, 64} {
		b := segmentBytes(f, synthEntries(newGen(byte(80+i)), n, 5, uint32(i)))
		f.Add(b, false)
		f.Add(b, true)
	}
	f.Add(segmentBytes(f, frameEntries(newGen(84))), true)
	f.Add([]byte("BOXDISEG"), false)
	f.Fuzz(func(t *testing.T, b []byte, reseal bool) {
		if reseal && len(b) >= segHeaderSize+segTrailerSize {
			b = resealSegment(bytes.Clone(b))
		}
		seg, err := parseSegment(b)
		if err != nil {
			return
		}
		var prev indexEntry
		for i := range seg.n {
			e := seg.entry(i)
			if i > 0 && compareEntries(&prev, &e) >= 0 {
				t.Fatalf("entry %d out of order", i)
			}
			prev = e
			if err := e.Loc.entry().check(maxPackSize); err != nil {
				t.Fatalf("entry %d: %v", i, err)
			}
			if _, ok := seg.packIndex(e.Loc.Pack); !ok {
				t.Fatalf("entry %d in an unlisted pack", i)
			}
			j := seg.search(&e.ID)
			if j > i || !seg.idAt(j, &e.ID) {
				t.Fatalf("entry %d not found (search gives %d)", i, j)
			}
		}
	})
}

// TestOpenSegmentFiles covers the files Open finds in the index folder.
func TestOpenSegmentFiles(t *testing.T) {
	dir := t.TempDir()
	x := newChunkIndex(dir)
	g, err := x.writeSegment(synthEntries(newGen(73), 50, 10, 0))
	if err != nil {
		t.Fatal(err)
	}
	g.release()
	tests := []struct {
		name string
		path string
		ok   bool
	}{
		{"segment", filepath.Join(dir, segmentName(0)), true},
		{"missing", filepath.Join(dir, segmentName(1)), false},
		{"not a segment name", filepath.Join(dir, "seg-1.idx"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g, err := openSegment(tt.path)
			if (err == nil) != tt.ok {
				t.Fatalf("openSegment(%s) = %v", tt.path, err)
			}
			if g != nil {
				g.release()
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, segmentName(0))); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(fenceBitsFor(0), fenceBitsFor(15), fenceBitsFor(16), fenceBitsFor(1<<20)) != "0 0 1 17" {
		t.Errorf("fence sizes %d %d %d %d", fenceBitsFor(0), fenceBitsFor(15), fenceBitsFor(16), fenceBitsFor(1<<20))
	}
}

func TestPackCounter(t *testing.T) {
	tests := []struct {
		name  string
		packs []uint32
	}{
		{"one", []uint32{7}},
		{"rising", []uint32{1, 2, 2, 3, 9}},
		{"falling", []uint32{900, 500, 20, 3, 0}},
		{"mixed", []uint32{40, 2, 40, 77, 1, 3, 2}},
		{"sparse", []uint32{5, 1 << 31, 6, 1<<32 - 1, 0}},
		{"dense then sparse", []uint32{1, 2, 3, maxDensePacks + 10, 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c packCounter
			want := map[uint32]uint32{}
			for _, p := range tt.packs {
				c.add(p)
				want[p]++
			}
			got := c.sorted()
			if len(got) != len(want) {
				t.Fatalf("%d packs counted, want %d: %v", len(got), len(want), got)
			}
			for i, pc := range got {
				if i > 0 && got[i-1].pack >= pc.pack {
					t.Fatalf("not sorted: %v", got)
				}
				if want[pc.pack] != pc.n {
					t.Fatalf("pack %d counted %d, want %d", pc.pack, pc.n, want[pc.pack])
				}
			}
		})
	}
}
