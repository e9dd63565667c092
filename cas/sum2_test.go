package cas

import (
	"crypto/sha256"
	"math/rand/v2"
	"testing"
)

// TestSum2 compares sum2 with crypto/sha256 on chunks of many kinds.
func TestSum2(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	random := func() *[ChunkSize]byte {
		var b [ChunkSize]byte
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return &b
	}
	filled := func(v byte) *[ChunkSize]byte {
		var b [ChunkSize]byte
		for i := range b {
			b[i] = v
		}
		return &b
	}
	oneBit := func(i int) *[ChunkSize]byte {
		b := filled(0)
		b[i/8] = 1 << (i % 8)
		return b
	}
	for _, tc := range []struct {
		name string
		a, b *[ChunkSize]byte
	}{
		{"zero and zero", filled(0), filled(0)},
		{"zero and ones", filled(0), filled(0xff)},
		{"random and zero", random(), filled(0)},
		{"both random", random(), random()},
		{"the same chunk twice", filled(0x5a), filled(0x5a)},
		{"first bit and last bit", oneBit(0), oneBit(ChunkSize*8 - 1)},
		{"a bit in the middle of a block", oneBit(64*8*31 + 100), random()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ga, gb := sum2(tc.a, tc.b)
			if wa := ID(sha256.Sum256(tc.a[:])); ga != wa {
				t.Errorf("first sum %x, want %x", ga, wa)
			}
			if wb := ID(sha256.Sum256(tc.b[:])); gb != wb {
				t.Errorf("second sum %x, want %x", gb, wb)
			}
		})
	}
	for i := range 1000 {
		a, b := random(), random()
		ga, gb := sum2(a, b)
		if ga != sha256.Sum256(a[:]) || gb != sha256.Sum256(b[:]) {
			t.Fatalf("random pair %d: sums differ from crypto/sha256", i)
		}
	}
}

func BenchmarkSum2(b *testing.B) {
	var x, y [ChunkSize]byte
	for i := range x {
		x[i], y[i] = byte(i), byte(i*7)
	}
	b.SetBytes(2 * ChunkSize)
	for b.Loop() {
		sum2(&x, &y)
	}
}

func BenchmarkSum256Twice(b *testing.B) {
	var x, y [ChunkSize]byte
	for i := range x {
		x[i], y[i] = byte(i), byte(i*7)
	}
	b.SetBytes(2 * ChunkSize)
	for b.Loop() {
		sha256.Sum256(x[:])
		sha256.Sum256(y[:])
	}
}
