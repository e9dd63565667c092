package cas

import (
	"testing"

	"github.com/containerd/errdefs"
)

// Seal makes the pack being filled durable in the background; chunks put
// after it go to a new pack, and after Commit every chunk reads back from a
// store opened afresh, in as many packs as were sealed.
func TestWriterSeal(t *testing.T) {
	g := newGen(13)
	tests := []struct {
		name  string
		parts [][]byte // written with WriteStream, Seal called after each
		packs int
	}{
		{"nothing written", [][]byte{nil}, 0},
		{"one part", [][]byte{g.half()}, 1},
		{"two parts", [][]byte{g.text(), g.random(3 * ChunkSize)}, 2},
		{"an empty part between", [][]byte{g.text(), nil, g.half()}, 2},
		{"a part of known chunks", [][]byte{g.text(), nil, g.half()}, 2},
		{"batches", [][]byte{g.random(batchChunks*ChunkSize + 9), g.half(), make([]byte, ChunkSize)}, 2},
	}
	// The known part repeats the first.
	tests[4].parts[1] = tests[4].parts[0]
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			w := s.NewWriter()
			var ids []ID
			var chunks [][]byte
			for _, p := range tc.parts {
				got, err := writeStream(w, p)
				if err != nil {
					t.Fatal(err)
				}
				ids = append(ids, got...)
				chunks = append(chunks, chunksOf(p)...)
				if err := w.Seal(); err != nil {
					t.Fatalf("Seal: %v", err)
				}
			}
			if err := w.Commit(); err != nil {
				t.Fatal(err)
			}
			if st := w.Stats(); st.Packs != tc.packs {
				t.Errorf("sealed %d packs, want %d", st.Packs, tc.packs)
			}
			if err := w.Seal(); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("Seal after Commit = %v, want a failed precondition", err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			if n := len(packFiles(t, s)); n != tc.packs {
				t.Errorf("%d pack files, want %d", n, tc.packs)
			}
			checkReadable(t, s, ids, chunks)
			checkVerify(t, s)
		})
	}
}
