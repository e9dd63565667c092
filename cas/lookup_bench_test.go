package cas

import (
	"testing"
)

// BenchmarkLookupMany resolves every chunk of a 64 MiB image in one call,
// as a restore does for its page table.
func BenchmarkLookupMany(b *testing.B) {
	s := openStore(b, b.TempDir())
	g := newGen(3)
	data := g.random(64 << 20)
	ids, _ := ingest(b, s, data)
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.LookupMany(ids); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(ids)), "ns/chunk")
}
