package cas

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

// smallPack returns the bytes of a sealed pack of a few raw and s2 chunks.
func smallPack(t testing.TB) []byte {
	g := newGen(40)
	return sealSmallPack(t, t.TempDir(), [][]byte{g.random(ChunkSize), g.text(), g.half()})
}

// trailerFor builds a trailer with good checksums around footer.
func trailerFor(footer []byte, footerOff uint64, count uint32) []byte {
	var tr [trailerSize]byte
	binary.LittleEndian.PutUint64(tr[0:], footerOff)
	binary.LittleEndian.PutUint32(tr[8:], count)
	binary.LittleEndian.PutUint32(tr[12:], crc32.Checksum(footer, castagnoli))
	binary.LittleEndian.PutUint32(tr[16:], packVersion)
	binary.LittleEndian.PutUint32(tr[20:], crc32.Checksum(tr[:20], castagnoli))
	copy(tr[24:], trailerMagic[:])
	return append(append([]byte(nil), footer...), tr[:]...)
}

// wrappedFooter is a footer whose offset, plus the footer and trailer
// sizes, wraps around 2^64 to the pack's size: a tail longer than the pack.
func wrappedFooter() ([]byte, int64) {
	size := int64(packHeaderSize + trailerSize)
	footer := make([]byte, entrySize)
	Entry{ID: Sum([]byte{1}), Offset: packHeaderSize, Stored: ChunkSize, Raw: ChunkSize, Codec: CodecRaw}.marshal(footer)
	off := uint64(size) - uint64(entrySize+trailerSize) // wraps
	return trailerFor(footer, off, 1), size
}

func TestDecodeFooter(t *testing.T) {
	pack := smallPack(t)
	size := int64(len(pack))
	packed := packedPack(t)
	wrapped, wrappedSize := wrappedFooter()
	tests := []struct {
		name    string
		tail    []byte
		size    int64
		entries int // -1: rejected
	}{
		{"whole pack", pack, size, 3},
		{"exact footer", pack[size-3*entrySize-trailerSize:], size, 3},
		{"trailer only", pack[size-trailerSize:], size, -1},
		{"footer short by a byte", pack[size-3*entrySize-trailerSize+1:], size, -1},
		{"wrong size", pack, size + 1, -1},
		{"truncated pack", pack[:size-1], size - 1, -1},
		{"empty", nil, size, -1},
		{"tiny size", pack, 10, -1},
		{"negative size", pack, -1, -1},
		{"offset wraps around", wrapped, wrappedSize, -1},
		{"empty pack", trailerFor(nil, packHeaderSize, 0), packHeaderSize + trailerSize, 0},
		{"packed footer", packed, int64(len(packed)), 9},
		{"packed footer cut short", packed[len(packed)-trailerSize-5:], int64(len(packed)), -1},
		{"packed pack cut", packed[:len(packed)-1], int64(len(packed)) - 1, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			entries, err := DecodeFooter(tt.tail, tt.size)
			if tt.entries < 0 {
				if err == nil {
					t.Fatalf("accepted %d entries", len(entries))
				}
				wantErrIs(t, err, errdefs.ErrDataLoss)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != tt.entries {
				t.Fatalf("%d entries, want %d", len(entries), tt.entries)
			}
			checkEntries(t, entries, tt.tail, tt.size)
		})
	}
}

// checkEntries fails unless every entry lies inside the chunk area of a pack
// of size bytes with len(entries) footer entries.
func checkEntries(t *testing.T, entries []Entry, tail []byte, size int64) {
	t.Helper()
	tr := tail[len(tail)-trailerSize:]
	footerOff := int64(binary.LittleEndian.Uint64(tr[0:]))
	if v := binary.LittleEndian.Uint32(tr[16:]); v == packVersion && footerOff != size-int64(len(entries))*entrySize-trailerSize {
		t.Fatalf("%d entries accepted with a footer at %d of a %d-byte pack", len(entries), footerOff, size)
	}
	if footerOff < packHeaderSize {
		t.Fatalf("%d entries accepted for a %d-byte pack", len(entries), size)
	}
	for i, e := range entries {
		if err := e.check(uint64(footerOff)); err != nil {
			t.Fatalf("entry %d accepted but fails its check: %v", i, err)
		}
		if int64(e.Offset) < packHeaderSize || int64(e.Offset)+int64(e.Stored) > footerOff {
			t.Fatalf("entry %d at %d+%d outside the chunk area [%d, %d)", i, e.Offset, e.Stored, packHeaderSize, footerOff)
		}
	}
}

func FuzzDecodeFooter(f *testing.F) {
	pack := smallPack(f)
	size := int64(len(pack))
	tail := pack[size-3*entrySize-trailerSize:]
	f.Add(pack, size)
	f.Add(tail, size)
	for _, n := range []int{1, entrySize, trailerSize, len(tail) - 1} {
		f.Add(tail[n:], size)                      // the reader passed too little
		f.Add(pack[:size-int64(n)], size-int64(n)) // the pack lost its end
	}
	wrapped, wrappedSize := wrappedFooter()
	f.Add(wrapped, wrappedSize)
	packed := packedPack(f)
	f.Add(packed, int64(len(packed)))
	f.Add(packed[len(packed)-trailerSize-20:], int64(len(packed)))
	f.Add(trailerFor(nil, packHeaderSize, 0), int64(packHeaderSize+trailerSize))
	f.Fuzz(func(t *testing.T, tail []byte, size int64) {
		entries, err := DecodeFooter(tail, size)
		if err != nil {
			if entries != nil {
				t.Fatal("entries returned with an error")
			}
			return
		}
		checkEntries(t, entries, tail, size)
		// The footer lies at the end of tail; re-encoding the entries
		// gives its bytes back (all but the ignored reserved byte). A
		// packed footer (version 2) runs from the trailer's offset.
		tr := tail[len(tail)-trailerSize:]
		footerLen := len(entries) * entrySize
		if binary.LittleEndian.Uint32(tr[16:]) == packVersionPacked {
			footerLen = int(size-int64(binary.LittleEndian.Uint64(tr[0:]))) - trailerSize
		} else {
			footer := tail[len(tail)-trailerSize-footerLen : len(tail)-trailerSize]
			b := make([]byte, entrySize)
			for i, e := range entries {
				e.marshal(b)
				if !bytes.Equal(b[:47], footer[i*entrySize:i*entrySize+47]) {
					t.Fatalf("entry %d does not re-encode to its footer bytes", i)
				}
			}
		}
		// Only the footer and trailer matter.
		again, err := DecodeFooter(tail[len(tail)-trailerSize-footerLen:], size)
		if err != nil || len(again) != len(entries) {
			t.Fatalf("the bare footer decodes differently: %d entries, %v", len(again), err)
		}
	})
}

func FuzzDecodeLocation(f *testing.F) {
	f.Add(Location{Pack: 3, Offset: 16, Stored: ChunkSize, Codec: CodecRaw}.marshal())
	f.Add(Location{Pack: 1 << 31, Offset: 1 << 30, Stored: 120, Codec: CodecS2}.marshal())
	f.Add(Location{Pack: 0, Offset: 0, Stored: 1, Codec: CodecS2}.marshal())
	f.Add(Location{Pack: 0, Offset: 16, Stored: 100, Codec: CodecRaw}.marshal())
	f.Add(Location{Pack: 0, Offset: 16, Stored: 100, Codec: 7}.marshal())
	f.Add(Location{Pack: 2, Offset: 16, Stored: 9000, Codec: CodecZstd, Slot: 4, Frame: 9}.marshal())
	f.Add(Location{Pack: 2, Offset: 16, Stored: 9000, Codec: CodecZstd, Slot: 9, Frame: 9}.marshal())
	f.Add([]byte{})
	f.Add(make([]byte, locationSize+1))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := DecodeLocation(b)
		if err != nil {
			if l != (Location{}) {
				t.Fatal("location returned with an error")
			}
			return
		}
		if !bytes.Equal(l.marshal(), b) {
			t.Fatalf("%+v re-encodes to %x, not %x", l, l.marshal(), b)
		}
		if err := l.entry().check(maxPackSize); err != nil {
			t.Fatalf("%+v accepted but fails its check: %v", l, err)
		}
		framed := l.Codec == CodecZstd && l.Slot < l.Frame && l.Stored < uint32(l.Frame)*ChunkSize
		single := l.Codec <= CodecS2 && l.Stored <= ChunkSize && (l.Codec != CodecRaw || l.Stored == ChunkSize) && l.Slot == 0 && l.Frame == 0
		if l.Stored == 0 || l.Offset < packHeaderSize || !framed && !single {
			t.Fatalf("implausible location accepted: %+v", l)
		}
	})
}

// FuzzPackRoundTrip writes the chunks of data to a pack, seals it and reads
// the footer and every chunk back.
func FuzzPackRoundTrip(f *testing.F) {
	g := newGen(41)
	f.Add([]byte{1})
	f.Add(g.random(3 * ChunkSize))
	f.Add(append(g.text(), g.half()...))
	f.Add(bytes.Repeat([]byte{'a'}, 2*ChunkSize+5))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 16*ChunkSize {
			data = data[:16*ChunkSize]
		}
		chunks := chunksOf(data)
		if len(chunks) == 0 {
			return
		}
		dir := t.TempDir()
		b := sealSmallPack(t, dir, chunks)
		pf, err := os.Open(filepath.Join(dir, packName(7)))
		if err != nil {
			t.Fatal(err)
		}
		defer pf.Close()
		entries, size, err := readFooter(pf)
		if err != nil {
			t.Fatal(err)
		}
		if size != int64(len(b)) || len(entries) != len(chunks) {
			t.Fatalf("%d entries in a %d-byte pack; want %d in %d", len(entries), size, len(chunks), len(b))
		}
		out := make([]byte, ChunkSize)
		for i, e := range entries {
			if e.ID != Sum(chunks[i]) {
				t.Fatalf("entry %d: id %s", i, e.ID.Short())
			}
			raw, err := decode(e, b[e.Offset:e.Offset+e.Stored], out)
			if err != nil || !bytes.Equal(raw, chunks[i]) {
				t.Fatalf("entry %d (%v) does not decode to its chunk: %v", i, e.Codec, err)
			}
		}
	})
}

// packedPack returns a compacted pack of a few zstd frames, whose footer is
// packed (version 2).
func packedPack(t testing.TB) []byte {
	t.Helper()
	dir := t.TempDir()
	p, err := newPackWriterFlags(dir, 1, packCompacted)
	if err != nil {
		t.Fatal(err)
	}
	g := newGen(23)
	for _, n := range []int{3, 1, 5} {
		var raw []byte
		ids := make([]ID, n)
		for i := range ids {
			c := g.text()
			ids[i] = Sum(c)
			raw = append(raw, c...)
		}
		frame, err := encodeFrame(raw, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.addFrame(ids, frame); err != nil {
			t.Fatal(err)
		}
	}
	path, _, err := p.seal()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
