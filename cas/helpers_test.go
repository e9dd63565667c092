package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"
)

// openStore opens (or creates) a store in dir and closes it at cleanup.
func openStore(t testing.TB, dir string) *Store {
	t.Helper()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// gen makes deterministic test data.
type gen struct{ r *rand.ChaCha8 }

func newGen(seed byte) *gen { return &gen{rand.NewChaCha8([32]byte{seed, 'c', 'a', 's'})} }

// random returns n incompressible bytes.
func (g *gen) random(n int) []byte {
	b := make([]byte, n)
	_, _ = g.r.Read(b)
	return b
}

// text returns one compressible, unique chunk: repeated prose plus a tag.
func (g *gen) text() []byte {
	var tag [8]byte
	_, _ = g.r.Read(tag[:])
	line := fmt.Sprintf("chunk %x: the quick brown fox jumps over the lazy dog. ", tag)
	return []byte(strings.Repeat(line, ChunkSize/len(line)+1)[:ChunkSize])
}

// half returns one chunk whose first half is random and second half text:
// it compresses to a little over half its size.
func (g *gen) half() []byte {
	c := g.text()
	_, _ = g.r.Read(c[:ChunkSize/2])
	return c
}

// chunksOf cuts data into ChunkSize chunks, zero-padding the tail.
func chunksOf(data []byte) [][]byte {
	var out [][]byte
	for len(data) > 0 {
		c := make([]byte, ChunkSize)
		n := copy(c, data)
		out = append(out, c)
		data = data[n:]
	}
	return out
}

// ingest writes data through one Writer, commits it, and returns the ids
// WriteStream emitted and the Writer's stats.
func ingest(t testing.TB, s *Store, data []byte) ([]ID, WriteStats) {
	t.Helper()
	w := s.NewWriter()
	ids, err := writeStream(w, data)
	if err != nil {
		w.Abort()
		t.Fatalf("WriteStream: %v", err)
	}
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return ids, w.Stats()
}

func writeStream(w *Writer, data []byte) ([]ID, error) {
	var ids []ID
	n, err := w.WriteStream(context.Background(), bytes.NewReader(data), func(i int64, id ID) error {
		if i != int64(len(ids)) {
			return fmt.Errorf("emit index %d, want %d", i, len(ids))
		}
		ids = append(ids, id)
		return nil
	})
	if err == nil && n != int64(len(data)) {
		err = fmt.Errorf("WriteStream read %d bytes, want %d", n, len(data))
	}
	return ids, err
}

// checkReadable fails unless every chunk reads back as want[i].
func checkReadable(t testing.TB, s *Store, ids []ID, want [][]byte) {
	t.Helper()
	buf := make([]byte, ChunkSize)
	for i, id := range ids {
		got, err := s.Get(id, buf)
		if err != nil {
			t.Fatalf("Get(chunk %d, %s): %v", i, id.Short(), err)
		}
		if !bytes.Equal(got, want[i]) {
			t.Fatalf("Get(chunk %d, %s): wrong bytes", i, id.Short())
		}
	}
}

// checkVerify fails unless Verify finds nothing wrong.
func checkVerify(t testing.TB, s *Store) VerifyResult {
	t.Helper()
	res, err := s.Verify(context.Background(), nil)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if len(res.Damaged) > 0 {
		t.Fatalf("Verify found damage: %v", res.Damaged)
	}
	return res
}

// packFiles lists the file names in the store's packs folder.
func packFiles(t testing.TB, s *Store) []string {
	t.Helper()
	ents, err := os.ReadDir(s.packsDir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// flipByte inverts one byte of a file.
func flipByte(t testing.TB, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

func wantErrIs(t testing.TB, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error %v: want one matching %v", err, target)
	}
}

// sealSmallPack writes a sealed pack of the given chunks into dir and
// returns its bytes.
func sealSmallPack(t testing.TB, dir string, chunks [][]byte) []byte {
	t.Helper()
	p, err := newPackWriter(dir, 7)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range chunks {
		stored, codec := encodeForTest(c)
		if _, err := p.add(Sum(c), stored, codec); err != nil {
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

// encodeForTest stores a chunk the way the Writer's rule says: s2 unless
// that saves less than 1/8 of the chunk.
func encodeForTest(c []byte) ([]byte, Codec) {
	enc := s2.Encode(nil, c)
	if len(enc) > ChunkSize-ChunkSize/8 {
		return c, CodecRaw
	}
	return enc, CodecS2
}
