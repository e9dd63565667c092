package cas

import (
	"bytes"
	"context"
	"crypto/sha256"
	"sync"
	"testing"
)

const benchSize = 64 << 20

// benchData is 64 MiB in the mix a disk image has: half-compressible
// chunks, some text, some random, some zeros and some repeats.
var benchData = sync.OnceValue(func() []byte {
	g := newGen(60)
	out := make([]byte, 0, benchSize)
	var prev []byte
	for i := 0; len(out) < benchSize; i++ {
		var c []byte
		switch i % 16 {
		case 0, 1, 2, 3, 4, 5, 6, 7:
			c = g.half()
		case 8, 9, 10:
			c = g.text()
		case 11, 12, 13:
			c = g.random(ChunkSize)
		case 14:
			c = make([]byte, ChunkSize)
		case 15:
			c = prev
		}
		prev = c
		out = append(out, c...)
	}
	return out[:benchSize]
})

func BenchmarkWriteStream(b *testing.B) {
	data := benchData()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	var stored int64
	for b.Loop() {
		b.StopTimer()
		s, err := Open(b.TempDir(), Options{})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		w := s.NewWriter()
		if _, err := w.WriteStream(context.Background(), bytes.NewReader(data), func(int64, ID) error { return nil }); err != nil {
			b.Fatal(err)
		}
		if err := w.Commit(); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		stored = w.Stats().NewStored
		s.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(stored)/float64(len(data)), "stored/raw")
}

// BenchmarkGet reads back every stored chunk of 16 MiB of the same data per
// op, one at a time, re-hash included.
func BenchmarkGet(b *testing.B) {
	data := benchData()[:16<<20]
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ids, _ := ingest(b, s, data)
	var stored []ID
	for id := range idSet(ids) {
		stored = append(stored, id)
	}
	buf := make([]byte, ChunkSize)
	b.SetBytes(int64(len(stored)) * ChunkSize)
	for b.Loop() {
		for _, id := range stored {
			if _, err := s.Get(id, buf); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkSHA256Floor hashes the WriteStream data in 4 KiB blocks on one
// core: the least any ingest must spend.
func BenchmarkSHA256Floor(b *testing.B) {
	data := benchData()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		for off := 0; off < len(data); off += ChunkSize {
			_ = sha256.Sum256(data[off : off+ChunkSize])
		}
	}
}
