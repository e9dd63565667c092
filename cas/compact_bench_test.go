package cas

import (
	"context"
	"fmt"
	"os"
	"testing"
)

// BenchmarkCompact compacts the 64 MiB WriteStream data, freshly ingested,
// per op, with frames of several sizes.
func BenchmarkCompact(b *testing.B) {
	data := benchData()
	for _, frame := range []int{16, 64, MaxFrameChunks} {
		b.Run(fmt.Sprintf("frame=%d", frame), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			var st CompactStats
			for b.Loop() {
				b.StopTimer()
				dir, err := os.MkdirTemp(b.TempDir(), "store")
				if err != nil {
					b.Fatal(err)
				}
				s, err := Open(dir, Options{})
				if err != nil {
					b.Fatal(err)
				}
				ingest(b, s, data)
				b.StartTimer()
				if st, err = s.Compact(context.Background(), CompactOptions{FrameChunks: frame}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				s.Close()
				_ = os.RemoveAll(dir)
				b.StartTimer()
			}
			b.ReportMetric(float64(st.BytesAfter)/float64(st.BytesBefore), "after/before")
		})
	}
}

// BenchmarkGetCompacted is BenchmarkGet after compaction: each chunk read
// in turn, in no order, decodes its frame unless the frame cache holds it.
func BenchmarkGetCompacted(b *testing.B) {
	data := benchData()[:16<<20]
	for _, frame := range []int{16, 64, MaxFrameChunks} {
		b.Run(fmt.Sprintf("frame=%d", frame), func(b *testing.B) {
			s, err := Open(b.TempDir(), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			ids, _ := ingest(b, s, data)
			if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: frame}); err != nil {
				b.Fatal(err)
			}
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
		})
	}
}
