package cas

import (
	"bytes"
	"errors"
	"testing"

	"github.com/containerd/errdefs"
)

// TestPackTransfer reads a sealed pack as another store would (OpenPack,
// PackTail, DecodeFooter), checks each chunk with Unpack and adds it to a
// second store with PutStored.
func TestPackTransfer(t *testing.T) {
	src := openStore(t, t.TempDir())
	g := newGen(3)
	data := append(append(g.random(40*ChunkSize), g.text()...), g.half()...)
	ids, _ := ingest(t, src, data)
	loc, err := src.Lookup(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	info, err := src.Pack(loc.Pack)
	if err != nil {
		t.Fatal(err)
	}
	f, entries, err := src.OpenPack(loc.Pack)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tail, err := PackTail(f, entries, info.Size)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := DecodeFooter(tail, info.Size); err != nil || len(again) != len(entries) || int(info.Chunks) != len(entries) {
		t.Fatalf("footer from PackTail: %d entries, %v; want %d", len(again), err, len(entries))
	}

	dst := openStore(t, t.TempDir())
	w := dst.NewWriter()
	for _, e := range entries {
		stored := make([]byte, e.Stored)
		if _, err := f.ReadAt(stored, int64(e.Offset)); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			name   string
			stored []byte
			want   error
		}{
			{"damaged", append([]byte{stored[0] ^ 0xff}, stored[1:]...), errdefs.ErrDataLoss},
			{"short", stored[:len(stored)-1], errdefs.ErrDataLoss},
			{"good", stored, nil},
		} {
			_, err := Unpack(e, tc.stored, nil)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("Unpack of a %s chunk: %v, want %v", tc.name, err, tc.want)
			}
		}
		for range 2 { // the second is skipped: the chunk is pending
			if err := w.PutStored(e, stored); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		want, err := src.Get(e.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, err := dst.Get(e.ID, nil)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("chunk %s in the second store: %v", e.ID, err)
		}
	}
	checkVerify(t, dst)
}

// TestEvict removes a pack: its chunks are gone from the index and its
// file from the folder, the other pack's chunks stay readable, and a new
// Open does not bring it back.
func TestEvict(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	g := newGen(5)
	first, second := g.random(16*ChunkSize), g.random(16*ChunkSize)
	idsA, _ := ingest(t, s, first)
	idsB, _ := ingest(t, s, second)
	uses, err := s.PackUses()
	if err != nil || len(uses) != 2 {
		t.Fatalf("PackUses: %d %v, want 2", len(uses), err)
	}
	if _, err := s.Get(idsB[0], nil); err != nil {
		t.Fatal(err)
	}
	if uses, _ = s.PackUses(); !uses[1].LastRead.After(uses[0].LastRead) {
		t.Fatalf("the pack read last is not last: %+v", uses)
	}
	locA, err := s.Lookup(idsA[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Evict([]uint32{locA.Pack}); err != nil {
		t.Fatal(err)
	}
	for _, id := range idsA {
		if s.Has(id) {
			t.Fatalf("chunk %s of the evicted pack is still indexed", id)
		}
	}
	checkReadable(t, s, idsB, chunksOf(second))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	if s.Has(idsA[0]) {
		t.Fatal("the evicted pack came back on Open")
	}
	checkReadable(t, s, idsB, chunksOf(second))
}
