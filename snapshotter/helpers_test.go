package snapshotter

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/boxd-dev/boxd/cas"
)

const bs = cas.ChunkSize

// newRand returns a deterministic source for seed.
func newRand(seed uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, 0x626f7864))
}

// randomBytes returns n bytes of incompressible data.
func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// fillBlock overwrites block n of data with random bytes (clipped to data).
func fillBlock(r *rand.Rand, data []byte, n int) {
	lo := n * bs
	hi := min(lo+bs, len(data))
	copy(data[lo:hi], randomBytes(r, hi-lo))
}

// ingest stores data as snapshot name over parent ("" for none).
func ingest(t testing.TB, g *Graph, name, parent string, data []byte) Snapshot {
	t.Helper()
	s, err := g.Ingest(context.Background(), bytes.NewReader(data), IngestOptions{Name: name, Parent: parent})
	if err != nil {
		t.Fatalf("Ingest(%s, parent %q): %v", name, parent, err)
	}
	return s
}

// export writes map m of snapshot name to a file and returns its path.
func export(t testing.TB, g *Graph, name, m string) string {
	t.Helper()
	r, err := g.OpenMap(name, m)
	if err != nil {
		t.Fatalf("OpenMap(%s, %s): %v", name, m, err)
	}
	out := filepath.Join(t.TempDir(), name+"."+m)
	if err := r.Export(context.Background(), out, nil); err != nil {
		t.Fatalf("Export(%s, %s): %v", name, m, err)
	}
	return out
}

// checkExport exports map m of snapshot name and compares it with want.
func checkExport(t testing.TB, g *Graph, name, m string, want []byte) {
	t.Helper()
	out := export(t, g, name, m)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("export of %s/%s: %d bytes differ from the %d-byte source (first difference at %d)", name, m, len(got), len(want), firstDiff(got, want))
	}
	_ = os.Remove(out)
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// changedBlocks counts the blocks of child that differ from parent, reading
// past either end as zeros, over the child's length.
func changedBlocks(parent, child []byte) int64 {
	var n int64
	pad := func(b []byte, lo int) []byte {
		out := make([]byte, bs)
		if lo < len(b) {
			copy(out, b[lo:min(lo+bs, len(b))])
		}
		return out
	}
	parentLen := len(parent)
	for lo := 0; lo < len(child); lo += bs {
		p := pad(parent, lo)
		if lo >= parentLen {
			p = make([]byte, bs)
		}
		if !bytes.Equal(p, pad(child, lo)) {
			n++
		}
	}
	return n
}

// verifyOK fails the test unless Verify finds nothing wrong.
func verifyOK(t testing.TB, g *Graph) VerifyResult {
	t.Helper()
	res, err := g.Verify(context.Background(), nil)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !res.OK() {
		t.Fatalf("Verify found damage %v and problems %v", res.Damaged, res.Problems)
	}
	return res
}
