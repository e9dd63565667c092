package cas

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// expectStats computes what a Writer should count for chunks offered to a
// store that already holds the chunks in stored (which it updates).
func expectStats(chunks [][]byte, stored map[ID]bool) WriteStats {
	var st WriteStats
	for _, c := range chunks {
		st.Chunks++
		id := Sum(c)
		switch {
		case id == ZeroID:
			st.ZeroChunks++
		case stored[id]:
			st.ReusedChunk++
		default:
			st.NewChunks++
			stored[id] = true
		}
	}
	return st
}

func TestRoundTrip(t *testing.T) {
	g := newGen(1)
	a, b := g.random(ChunkSize), g.text()
	zero := make([]byte, ChunkSize)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	// counted is n small chunks, each holding its number modulo period, so
	// chunks repeat across batches that are in flight together.
	counted := func(n, period int) []byte {
		out := make([]byte, n*ChunkSize)
		for i := range n {
			binary.LittleEndian.PutUint64(out[i*ChunkSize+100:], uint64(i%period)+1)
		}
		return out
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"one byte", []byte{7}},
		{"one zero byte", []byte{0}},
		{"short tail only", g.random(1000)},
		{"one random chunk", a},
		{"one zero chunk", zero},
		{"zeros only", make([]byte, 5*ChunkSize)},
		{"repeated chunk", cat(a, a, a, b, a, b)},
		{"random chunks", g.random(300 * ChunkSize)},
		{"compressible chunks", cat(g.text(), g.text(), g.text(), b, b)},
		{"mixed with tail", cat(a, zero, b, g.random(2*ChunkSize), zero, a, g.half(), b, g.random(123))},
		{"tail repeats an earlier chunk", cat(a, b, a[:ChunkSize-1])},
		{"more than one batch", cat(g.random(batchChunks*ChunkSize), zero, a, g.random(batchChunks*ChunkSize+17))},
		{"more batches than wait to be collected", cat(counted((lookahead(8)+6)*batchChunks, 5000), g.random(99))},
	}
	for _, tt := range tests {
		for _, workers := range []int{1, 3, 8} {
			t.Run(fmt.Sprintf("%s/workers=%d", tt.name, workers), func(t *testing.T) {
				s := openStore(t, t.TempDir())
				want := chunksOf(tt.data)
				w := s.NewWriter()
				w.Workers = workers
				ids, err := writeStream(w, tt.data)
				if err != nil {
					t.Fatal(err)
				}
				if err := w.Commit(); err != nil {
					t.Fatal(err)
				}
				if len(ids) != len(want) {
					t.Fatalf("emitted %d ids, want %d", len(ids), len(want))
				}
				distinct := map[ID]bool{}
				for i, c := range want {
					if ids[i] != Sum(c) {
						t.Fatalf("chunk %d: id %s, want %s", i, ids[i].Short(), Sum(c).Short())
					}
				}
				st := expectStats(want, distinct)
				got := w.Stats()
				if got.Chunks != st.Chunks || got.ZeroChunks != st.ZeroChunks || got.NewChunks != st.NewChunks || got.ReusedChunk != st.ReusedChunk {
					t.Errorf("stats %+v, want chunks %d zero %d new %d reused %d", got, st.Chunks, st.ZeroChunks, st.NewChunks, st.ReusedChunk)
				}
				if wantPacks := min(int(st.NewChunks), 1); got.Packs != wantPacks {
					t.Errorf("sealed %d packs, want %d", got.Packs, wantPacks)
				}
				checkReadable(t, s, ids, want)

				ss, err := s.Stats()
				if err != nil {
					t.Fatal(err)
				}
				if ss.Chunks != int64(len(distinct)) {
					t.Errorf("Stats().Chunks = %d, want %d distinct non-zero chunks", ss.Chunks, len(distinct))
				}
				if ss.StoredBytes != got.NewStored {
					t.Errorf("Stats().StoredBytes = %d, writer stored %d", ss.StoredBytes, got.NewStored)
				}
				if _, err := s.Lookup(ZeroID); !errors.Is(err, errdefs.ErrNotFound) {
					t.Errorf("Lookup(ZeroID) = %v, want errdefs.ErrNotFound: the zero chunk is never stored", err)
				}
				if !s.Has(ZeroID) {
					t.Error("Has(ZeroID) = false")
				}
				checkVerify(t, s)
			})
		}
	}
}

func TestCodecChoice(t *testing.T) {
	g := newGen(2)
	randomPrefix := func(n int) []byte {
		c := make([]byte, ChunkSize)
		copy(c, g.random(n))
		return c
	}
	tests := []struct {
		name  string
		chunk []byte
		want  Codec
	}{
		{"random", g.random(ChunkSize), CodecRaw},
		{"text", g.text(), CodecS2},
		{"half random", g.half(), CodecS2},
		{"single byte then zeros", append([]byte{1}, make([]byte, ChunkSize-1)...), CodecS2},
		{"saves about 1/4", randomPrefix(3 * ChunkSize / 4), CodecS2},
		{"saves a little over 1/8", randomPrefix(ChunkSize - ChunkSize/8 - 64), CodecS2},
		{"saves a little under 1/8", randomPrefix(ChunkSize - ChunkSize/8 + 16), CodecRaw},
		{"saves about 1/16", randomPrefix(ChunkSize - ChunkSize/16), CodecRaw},
	}
	s := openStore(t, t.TempDir())
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, rule := encodeForTest(tt.chunk); rule != tt.want {
				t.Fatalf("test data: s2 gives %d bytes, so the 1/8 rule picks %v, not %v", len(s2Len(tt.chunk)), rule, tt.want)
			}
			w := s.NewWriter()
			id, err := w.Put(tt.chunk)
			if err != nil {
				w.Abort()
				t.Fatal(err)
			}
			if err := w.Commit(); err != nil {
				t.Fatal(err)
			}
			loc, err := s.Lookup(id)
			if err != nil {
				t.Fatal(err)
			}
			if loc.Codec != tt.want {
				t.Errorf("codec %v, want %v", loc.Codec, tt.want)
			}
			if loc.Codec == CodecRaw && loc.Stored != ChunkSize {
				t.Errorf("raw chunk stored in %d bytes", loc.Stored)
			}
			if loc.Codec == CodecS2 && loc.Stored > ChunkSize-ChunkSize/8 {
				t.Errorf("s2 chunk stored in %d bytes, saving less than 1/8", loc.Stored)
			}
			checkReadable(t, s, []ID{id}, [][]byte{tt.chunk})
		})
	}
}

func s2Len(c []byte) []byte { enc, _ := encodeForTest(c); return enc }

func TestPut(t *testing.T) {
	g := newGen(3)
	a := g.text()
	tests := []struct {
		name  string
		chunk []byte
		want  []byte
	}{
		{"full chunk", a, a},
		{"short chunk is padded", a[:100], append(append([]byte(nil), a[:100]...), make([]byte, ChunkSize-100)...)},
		{"zero chunk", make([]byte, ChunkSize), make([]byte, ChunkSize)},
		{"empty chunk is the zero chunk", nil, make([]byte, ChunkSize)},
	}
	s := openStore(t, t.TempDir())
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := s.NewWriter()
			id, err := w.Put(tt.chunk)
			if err != nil {
				w.Abort()
				t.Fatal(err)
			}
			if err := w.Commit(); err != nil {
				t.Fatal(err)
			}
			if id != Sum(tt.chunk) || id != Sum(tt.want) {
				t.Fatalf("id %s, want %s", id.Short(), Sum(tt.want).Short())
			}
			checkReadable(t, s, []ID{id}, [][]byte{tt.want})
		})
	}
}

// TestClosedStore checks that reads from a closed store say it is closed,
// not that the chunk is missing (a caller would report a damaged snapshot).
func TestClosedStore(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	w := s.NewWriter()
	id, err := w.Put(newGen(4).text())
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	absent := Sum([]byte("never stored"))
	if _, err := s.Get(absent, nil); !errors.Is(err, errdefs.ErrNotFound) || errors.Is(err, ErrClosed) {
		t.Fatalf("an absent chunk of an open store: %v, want not found", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(id, nil); !errors.Is(err, ErrClosed) || errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get after Close: %v, want ErrClosed", err)
	}
	if _, err := s.LookupMany([]ID{id}); !errors.Is(err, ErrClosed) {
		t.Fatalf("LookupMany after Close: %v, want ErrClosed", err)
	}
}

func TestDedup(t *testing.T) {
	g := newGen(4)
	data := bytes.Join([][]byte{g.random(40 * ChunkSize), g.text(), make([]byte, ChunkSize), g.half(), g.random(77)}, nil)
	want := chunksOf(data)
	distinct := map[ID]bool{}
	first := expectStats(want, distinct)

	tests := []struct {
		name string
		// second ingests data again, after a first ingest by the same
		// process, and returns the store to check and the second stats.
		second func(t *testing.T, dir string, s *Store) (*Store, []ID, WriteStats)
	}{
		{"same writer", nil},
		{"second writer", func(t *testing.T, _ string, s *Store) (*Store, []ID, WriteStats) {
			ids, st := ingest(t, s, data)
			return s, ids, st
		}},
		{"after reopen", func(t *testing.T, dir string, s *Store) (*Store, []ID, WriteStats) {
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s2 := openStore(t, dir)
			if s2.Rebuilt {
				t.Error("a clean reopen rebuilt the index")
			}
			ids, st := ingest(t, s2, data)
			return s2, ids, st
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			var ids []ID
			var st WriteStats
			if tt.second == nil {
				// Twice through one Writer: the second pass finds every
				// chunk in the unsealed pack.
				w := s.NewWriter()
				ids1, err := writeStream(w, data)
				if err != nil {
					t.Fatal(err)
				}
				before := w.Stats()
				if ids, err = writeStream(w, data); err != nil {
					t.Fatal(err)
				}
				if err := w.Commit(); err != nil {
					t.Fatal(err)
				}
				if !idsEqual(ids1, ids) {
					t.Fatal("ids differ between passes")
				}
				after := w.Stats()
				st = WriteStats{Chunks: after.Chunks - before.Chunks, ZeroChunks: after.ZeroChunks - before.ZeroChunks,
					NewChunks: after.NewChunks - before.NewChunks, ReusedChunk: after.ReusedChunk - before.ReusedChunk}
				if after.Packs != 1 {
					t.Errorf("sealed %d packs, want 1", after.Packs)
				}
			} else {
				ids1, st1 := ingest(t, s, data)
				if st1.NewChunks != first.NewChunks {
					t.Fatalf("first ingest stored %d chunks, want %d", st1.NewChunks, first.NewChunks)
				}
				s, ids, st = tt.second(t, dir, s)
				if !idsEqual(ids1, ids) {
					t.Fatal("ids differ between ingests")
				}
				if st.Packs != 0 {
					t.Errorf("second ingest sealed %d packs, want 0", st.Packs)
				}
			}
			if st.NewChunks != 0 || st.NewStored != 0 {
				t.Errorf("second ingest stored %d new chunks (%d bytes), want 0", st.NewChunks, st.NewStored)
			}
			if st.ReusedChunk != first.NewChunks+first.ReusedChunk || st.ZeroChunks != first.ZeroChunks || st.Chunks != first.Chunks {
				t.Errorf("second ingest stats %+v; first %+v", st, first)
			}
			ss, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if ss.Chunks != int64(len(distinct)) || ss.Packs != 1 {
				t.Errorf("store holds %d chunks in %d packs, want %d in 1", ss.Chunks, ss.Packs, len(distinct))
			}
			checkReadable(t, s, ids, want)
			checkVerify(t, s)
		})
	}
}

func idsEqual(a, b []ID) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestPackSealing writes more than PackTarget of incompressible data, so the
// Writer seals packs on its own, then repeats data from before the seal, which
// the Writer must find in the index rather than store again.
func TestPackSealing(t *testing.T) {
	g := newGen(5)
	random := g.random(40 << 20)
	data := append(random, random[:2<<20]...)
	want := chunksOf(data)
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ids, st := ingest(t, s, data)
	if st.Packs < 2 {
		t.Errorf("sealed %d packs, want at least 2", st.Packs)
	}
	if wantNew := int64(len(random) / ChunkSize); st.NewChunks != wantNew || st.ReusedChunk != int64(len(want))-wantNew {
		t.Errorf("new %d reused %d, want %d and %d", st.NewChunks, st.ReusedChunk, wantNew, int64(len(want))-wantNew)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	ss, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if ss.Packs != st.Packs || len(packFiles(t, s)) != st.Packs {
		t.Errorf("index lists %d packs and the folder %v, want %d", ss.Packs, packFiles(t, s), st.Packs)
	}
	for _, name := range packFiles(t, s) {
		fi, err := os.Stat(filepath.Join(s.packsDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > PackTarget+ChunkSize+entrySize {
			t.Errorf("%s is %d bytes, more than a chunk over PackTarget", name, fi.Size())
		}
	}
	checkReadable(t, s, ids, want)
	res := checkVerify(t, s)
	if res.Packs != st.Packs || res.Chunks != st.NewChunks {
		t.Errorf("Verify checked %d packs, %d chunks; want %d, %d", res.Packs, res.Chunks, st.Packs, st.NewChunks)
	}
}

func TestCorruptChunk(t *testing.T) {
	g := newGen(6)
	tests := []struct {
		name  string
		codec Codec
		// where in the stored bytes to flip a byte
		at func(stored uint32) int64
	}{
		{"raw first byte", CodecRaw, func(uint32) int64 { return 0 }},
		{"raw middle", CodecRaw, func(n uint32) int64 { return int64(n / 2) }},
		{"raw last byte", CodecRaw, func(n uint32) int64 { return int64(n - 1) }},
		{"s2 first byte", CodecS2, func(uint32) int64 { return 0 }},
		{"s2 middle", CodecS2, func(n uint32) int64 { return int64(n / 2) }},
		{"s2 last byte", CodecS2, func(n uint32) int64 { return int64(n - 1) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var chunks [][]byte
			for range 8 {
				chunks = append(chunks, g.random(ChunkSize), g.text())
			}
			data := bytes.Join(chunks, nil)
			s := openStore(t, t.TempDir())
			ids, _ := ingest(t, s, data)
			victim := -1
			for i, id := range ids[4:] {
				if loc, _ := s.Lookup(id); loc.Codec == tt.codec {
					victim = i + 4
					break
				}
			}
			if victim < 0 {
				t.Fatalf("no %v chunk stored", tt.codec)
			}
			loc, err := s.Lookup(ids[victim])
			if err != nil {
				t.Fatal(err)
			}
			pack := packName(loc.Pack)
			flipByte(t, s.packPath(loc.Pack), int64(loc.Offset)+tt.at(loc.Stored))

			_, err = s.Get(ids[victim], nil)
			wantErrIs(t, err, errdefs.ErrDataLoss)
			if msg := err.Error(); !strings.Contains(msg, ids[victim].String()) || !strings.Contains(msg, pack) {
				t.Errorf("error %q does not name chunk %s and pack %s", msg, ids[victim], pack)
			}
			others := append(append([]ID(nil), ids[:victim]...), ids[victim+1:]...)
			otherChunks := append(append([][]byte(nil), chunks[:victim]...), chunks[victim+1:]...)
			checkReadable(t, s, others, otherChunks)

			res, err := s.Verify(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			want := Damage{Pack: pack, Chunk: ids[victim].String(), Offset: int64(loc.Offset)}
			if len(res.Damaged) != 1 {
				t.Fatalf("Verify found %v, want exactly %v", res.Damaged, want)
			}
			got := res.Damaged[0]
			got.Reason = ""
			if got != want {
				t.Errorf("Verify found %v, want %v", res.Damaged[0], want)
			}
		})
	}
}

func TestCorruptFooter(t *testing.T) {
	g := newGen(7)
	tests := []struct {
		name string
		at   func(size int64) int64 // offset of the byte to flip
	}{
		{"first footer entry", func(size int64) int64 { return size - trailerSize - 3*entrySize }},
		{"last footer entry", func(size int64) int64 { return size - trailerSize - 1 }},
		{"trailer footer offset", func(size int64) int64 { return size - trailerSize }},
		{"trailer count", func(size int64) int64 { return size - trailerSize + 8 }},
		{"trailer footer checksum", func(size int64) int64 { return size - trailerSize + 12 }},
		{"trailer magic", func(size int64) int64 { return size - 1 }},
		{"header magic", func(int64) int64 { return 0 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			ids, _ := ingest(t, s, bytes.Join([][]byte{g.random(ChunkSize), g.text(), g.half()}, nil))
			loc, err := s.Lookup(ids[0])
			if err != nil {
				t.Fatal(err)
			}
			path := s.packPath(loc.Pack)
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			flipByte(t, path, tt.at(fi.Size()))

			check := func(s *Store) {
				t.Helper()
				res, err := s.Verify(context.Background(), nil)
				if err != nil {
					t.Fatal(err)
				}
				if len(res.Damaged) != 1 || res.Damaged[0].Pack != packName(loc.Pack) || res.Damaged[0].Chunk != "" ||
					!strings.HasPrefix(res.Damaged[0].Reason, "footer unreadable") {
					t.Fatalf("Verify found %v, want the footer of %s unreadable", res.Damaged, packName(loc.Pack))
				}
			}
			check(s)

			// On reopen the index still knows the pack, so its chunks
			// stay readable; Verify still reports the footer.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			check(s)

			// A rebuild cannot read the footer: the pack is reported
			// damaged and its chunks are not indexed.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(filepath.Join(dir, "index.db")); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			if len(s.Damaged) != 1 || !strings.HasPrefix(s.Damaged[0], packName(loc.Pack)) {
				t.Errorf("Open reported damage %q, want %s", s.Damaged, packName(loc.Pack))
			}
			if _, err := s.Get(ids[0], nil); !errors.Is(err, errdefs.ErrNotFound) {
				t.Errorf("Get from an unindexable pack: %v, want errdefs.ErrNotFound", err)
			}
			check(s)
		})
	}
}

func TestIndexRebuild(t *testing.T) {
	g := newGen(8)
	tests := []struct {
		name  string
		spoil func(t *testing.T, dir string)
	}{
		{"index deleted", func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, "index.db")); err != nil {
				t.Fatal(err)
			}
		}},
		{"index overwritten with garbage", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "index.db"), newGen(99).random(64<<10), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"index truncated to a few bytes", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "index.db"), []byte("garbage"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"index of another version", func(t *testing.T, dir string) {
			db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			err = db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketMeta).Put(keyVersion, []byte{0, 0, 0, 9})
			})
			if err != nil {
				t.Fatal(err)
			}
		}},
		{"index with a bad pack record", func(t *testing.T, dir string) {
			db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			err = db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketPacks).Put(packKey(0), []byte("bad"))
			})
			if err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			data := bytes.Join([][]byte{g.random(20 * ChunkSize), g.text(), make([]byte, ChunkSize), g.half()}, nil)
			ids1, _ := ingest(t, s, data)
			data2 := bytes.Join([][]byte{g.text(), g.random(5 * ChunkSize), g.random(100)}, nil)
			ids2, _ := ingest(t, s, data2)
			before, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			tt.spoil(t, dir)

			s = openStore(t, dir)
			if !s.Rebuilt {
				t.Error("Rebuilt = false")
			}
			if len(s.Damaged) != 0 {
				t.Errorf("Damaged = %q", s.Damaged)
			}
			after, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if after.Chunks != before.Chunks || after.Packs != before.Packs || after.StoredBytes != before.StoredBytes || after.PackBytes != before.PackBytes {
				t.Errorf("rebuilt index holds %+v, want %+v", after, before)
			}
			checkReadable(t, s, ids1, chunksOf(data))
			checkReadable(t, s, ids2, chunksOf(data2))
			checkVerify(t, s)

			// New packs are numbered after the old ones.
			ids3, _ := ingest(t, s, g.random(3*ChunkSize))
			loc, err := s.Lookup(ids3[0])
			if err != nil {
				t.Fatal(err)
			}
			if loc.Pack < 2 {
				t.Errorf("new pack numbered %d, reusing an old number", loc.Pack)
			}
			checkReadable(t, s, ids1, chunksOf(data))
		})
	}
}

func TestOpenFreshStoreNotRebuilt(t *testing.T) {
	s := openStore(t, t.TempDir())
	if s.Rebuilt || len(s.Damaged) != 0 {
		t.Errorf("new store: Rebuilt %v, Damaged %q", s.Rebuilt, s.Damaged)
	}
}

// TestReconcile covers packs the index does not know and leftovers.
func TestReconcile(t *testing.T) {
	g := newGen(9)
	dataA := g.random(10 * ChunkSize)
	dataB := bytes.Join([][]byte{g.text(), g.random(4 * ChunkSize)}, nil)

	t.Run("sealed pack missing from the index", func(t *testing.T) {
		// Make a pack in another store and drop it into this one's
		// folder, as a crash between sealing and indexing would leave.
		other := openStore(t, t.TempDir())
		idsB, _ := ingest(t, other, dataB)
		locB, err := other.Lookup(idsB[0])
		if err != nil {
			t.Fatal(err)
		}
		packB, err := os.ReadFile(other.packPath(locB.Pack))
		if err != nil {
			t.Fatal(err)
		}

		dir := t.TempDir()
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		idsA, _ := ingest(t, s, dataA)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		const stray = 0x20
		if err := os.WriteFile(filepath.Join(dir, "packs", packName(stray)), packB, 0o600); err != nil {
			t.Fatal(err)
		}
		s = openStore(t, dir)
		if s.Rebuilt || len(s.Damaged) != 0 {
			t.Errorf("Rebuilt %v, Damaged %q", s.Rebuilt, s.Damaged)
		}
		checkReadable(t, s, idsA, chunksOf(dataA))
		checkReadable(t, s, idsB, chunksOf(dataB))
		if loc, err := s.Lookup(idsB[0]); err != nil || loc.Pack != stray {
			t.Errorf("Lookup = %+v, %v; want pack %d", loc, err, stray)
		}
		checkVerify(t, s)
		idsC, _ := ingest(t, s, g.random(ChunkSize))
		if loc, err := s.Lookup(idsC[0]); err != nil || loc.Pack <= stray {
			t.Errorf("next pack: %+v, %v; want one numbered after %d", loc, err, stray)
		}
	})

	t.Run("indexed pack gone from disk", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		idsA, _ := ingest(t, s, dataA)
		idsB, _ := ingest(t, s, dataB)
		locB, err := s.Lookup(idsB[0])
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(filepath.Join(dir, "packs", packName(locB.Pack))); err != nil {
			t.Fatal(err)
		}
		s = openStore(t, dir)
		checkReadable(t, s, idsA, chunksOf(dataA))
		for _, id := range idsB {
			if _, err := s.Lookup(id); !errors.Is(err, errdefs.ErrNotFound) {
				t.Fatalf("chunk of a vanished pack: %v, want errdefs.ErrNotFound", err)
			}
		}
		checkVerify(t, s)
	})

	t.Run("leftover tmp files removed", func(t *testing.T) {
		dir := t.TempDir()
		s, err := Open(dir, Options{})
		if err != nil {
			t.Fatal(err)
		}
		idsA, _ := ingest(t, s, dataA)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{packName(1) + ".123.tmp", "x.tmp"} {
			if err := os.WriteFile(filepath.Join(dir, "packs", name), []byte("half a pack"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		s = openStore(t, dir)
		for _, name := range packFiles(t, s) {
			if strings.HasSuffix(name, ".tmp") {
				t.Errorf("%s left after Open", name)
			}
		}
		if len(s.Damaged) != 0 {
			t.Errorf("Damaged = %q", s.Damaged)
		}
		checkReadable(t, s, idsA, chunksOf(dataA))
		checkVerify(t, s)
	})
}

func TestSecondOpenUnavailable(t *testing.T) {
	dir := t.TempDir()
	openStore(t, dir)
	s2, err := Open(dir, Options{LockTimeout: 100 * time.Millisecond})
	if err == nil {
		s2.Close()
		t.Fatal("second Open succeeded")
	}
	wantErrIs(t, err, errdefs.ErrUnavailable)
	if _, err := os.Stat(filepath.Join(dir, "index.db.damaged")); err == nil {
		t.Error("a locked index was set aside as damaged")
	}
}

// TestVerifyDuringWrite runs Verify while a Writer holds an unsealed pack:
// Verify must leave the Writer's temporary file alone.
func TestVerifyDuringWrite(t *testing.T) {
	g := newGen(10)
	s := openStore(t, t.TempDir())
	w := s.NewWriter()
	data := g.random(8 * ChunkSize)
	ids, err := writeStream(w, data)
	if err != nil {
		t.Fatal(err)
	}
	checkVerify(t, s)
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit after a Verify: %v", err)
	}
	checkReadable(t, s, ids, chunksOf(data))
	checkVerify(t, s)
}

func TestWriterErrors(t *testing.T) {
	g := newGen(11)
	data := g.random(3 * batchChunks * ChunkSize)
	boom := errors.New("boom")
	tests := []struct {
		name string
		r    func() *bytes.Reader
		emit func(i int64, id ID) error
		ctx  func() context.Context
		want error
	}{
		{"emit fails", nil, func(i int64, _ ID) error {
			if i == batchChunks+3 {
				return boom
			}
			return nil
		}, nil, boom},
		{"context cancelled", nil, nil, func() context.Context {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			return ctx
		}, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			w := s.NewWriter()
			ctx := context.Background()
			if tt.ctx != nil {
				ctx = tt.ctx()
			}
			emit := tt.emit
			if emit == nil {
				emit = func(int64, ID) error { return nil }
			}
			_, err := w.WriteStream(ctx, bytes.NewReader(data), emit)
			wantErrIs(t, err, tt.want)
			w.Abort()
			for _, name := range packFiles(t, s) {
				t.Errorf("%s left after Abort", name)
			}
			// The lock is free again.
			ids, _ := ingest(t, s, data[:ChunkSize])
			checkReadable(t, s, ids, chunksOf(data[:ChunkSize]))
		})
	}

	t.Run("read error", func(t *testing.T) {
		s := openStore(t, t.TempDir())
		w := s.NewWriter()
		_, err := w.WriteStream(context.Background(), &failReader{data: data[:5*ChunkSize+10], err: boom}, func(int64, ID) error { return nil })
		wantErrIs(t, err, boom)
		w.Abort()
	})

	t.Run("commit twice", func(t *testing.T) {
		s := openStore(t, t.TempDir())
		w := s.NewWriter()
		if err := w.Commit(); err != nil {
			t.Fatal(err)
		}
		if err := w.Commit(); err == nil {
			t.Error("second Commit succeeded")
		}
		w.Abort()
		s.NewWriter().Abort() // the lock was released once
	})
}

type failReader struct {
	data []byte
	err  error
}

func (r *failReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

// TestConcurrentGet reads committed chunks from several goroutines while a
// Writer ingests more. Run it under -race.
func TestConcurrentGet(t *testing.T) {
	g := newGen(12)
	s := openStore(t, t.TempDir())
	base := bytes.Join([][]byte{g.random(32 * ChunkSize), g.text(), g.text(), g.half()}, nil)
	baseIDs, _ := ingest(t, s, base)
	baseChunks := chunksOf(base)
	more := bytes.Join([][]byte{g.random(600 * ChunkSize), base, g.text()}, nil)

	done := make(chan struct{})
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for r := range 4 {
		wg.Go(func() {
			buf := make([]byte, ChunkSize)
			for n := 0; ; n++ {
				i := (n*7 + r) % len(baseIDs)
				got, err := s.Get(baseIDs[i], buf)
				if err == nil && !bytes.Equal(got, baseChunks[i]) {
					err = fmt.Errorf("chunk %d: wrong bytes", i)
				}
				if err != nil {
					errs <- err
					return
				}
				if n >= len(baseIDs) {
					select {
					case <-done:
						return
					default:
					}
				}
			}
		})
	}
	for range 2 {
		ids, _ := ingest(t, s, more)
		checkReadable(t, s, ids, chunksOf(more))
	}
	close(done)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	checkVerify(t, s)
}

// TestVerifyBesideWriters seals and removes packs while Verify runs (from
// its progress callback, after the packs were listed): a pack Verify did not
// list, or one GC removed, is not damage.
func TestVerifyBesideWriters(t *testing.T) {
	g := newGen(13)
	tests := []struct {
		name   string
		during func(t *testing.T, s *Store, idsB []ID)
	}{
		{"ingest seals a new pack", func(t *testing.T, s *Store, _ []ID) {
			ingest(t, s, g.random(4*ChunkSize))
		}},
		{"GC moves chunks and removes packs", func(t *testing.T, s *Store, idsB []ID) {
			keep := idSet(idsB[:2])
			if _, err := s.GC(context.Background(), func(id ID) bool { return keep[id] }, GCOptions{}); err != nil {
				t.Error(err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			dataA, dataB := g.random(8*ChunkSize), g.random(8*ChunkSize)
			ingest(t, s, dataA)
			idsB, _ := ingest(t, s, dataB)
			var once sync.Once
			res, err := s.Verify(context.Background(), func(done, total int64) {
				once.Do(func() { tt.during(t, s, idsB) })
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Damaged) != 0 {
				t.Errorf("Verify found %v", res.Damaged)
			}
			checkReadable(t, s, idsB[:2], chunksOf(dataB)[:2])
			checkVerify(t, s)
		})
	}
}

func TestVerifyIndexChecks(t *testing.T) {
	g := newGen(14)
	tests := []struct {
		name   string
		spoil  func(t *testing.T, s *Store, ids []ID)
		reason string
		count  func(ids []ID) int
	}{
		{"pack file removed under the index", func(t *testing.T, s *Store, ids []ID) {
			loc, _ := s.Lookup(ids[0])
			if err := os.Remove(s.packPath(loc.Pack)); err != nil {
				t.Fatal(err)
			}
		}, "indexed in a pack that is missing", func(ids []ID) int { return len(ids) }},
		{"index entry points at another chunk", func(t *testing.T, s *Store, ids []ID) {
			other, _ := s.Lookup(ids[1])
			rewriteIndex(t, s, func(entries []indexEntry) []indexEntry {
				for i := range entries {
					if entries[i].ID == ids[0] {
						entries[i].Loc = other
					}
				}
				return entries
			})
		}, "index entry disagrees with the pack footer", func([]ID) int { return 1 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			ids, _ := ingest(t, s, g.random(5*ChunkSize))
			tt.spoil(t, s, ids)
			res, err := s.Verify(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Damaged) != tt.count(ids) {
				t.Fatalf("Verify found %v, want %d entries", res.Damaged, tt.count(ids))
			}
			for _, d := range res.Damaged {
				if !strings.HasPrefix(d.Reason, tt.reason) || d.Chunk == "" {
					t.Errorf("damage %v, want reason %q", d, tt.reason)
				}
			}
		})
	}
}

func TestWriteStreamCancelledMidway(t *testing.T) {
	g := newGen(15)
	data := g.random(6 * batchChunks * ChunkSize)
	for _, at := range []int64{0, batchChunks - 1, 3 * batchChunks} {
		t.Run(fmt.Sprint(at), func(t *testing.T) {
			s := openStore(t, t.TempDir())
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			w := s.NewWriter()
			emitted := int64(0)
			n, err := w.WriteStream(ctx, bytes.NewReader(data), func(i int64, _ ID) error {
				emitted++
				if i == at {
					cancel()
				}
				return nil
			})
			wantErrIs(t, err, context.Canceled)
			if n == int64(len(data)) && emitted == int64(len(data)/ChunkSize) {
				t.Errorf("cancelled at chunk %d, yet every chunk was written", at)
			}
			w.Abort()
		})
	}
}

// TestStoreRaw checks that a Writer told to store raw keeps every new chunk
// uncompressed, through Put and WriteStream, leaves a chunk the store holds
// as it is, goes back to compressing when told, and that Compact still
// compresses what it stored raw.
func TestStoreRaw(t *testing.T) {
	g := newGen(9)
	known := g.text()
	s := openStore(t, t.TempDir())
	knownIDs, _ := ingest(t, s, known)

	streamed := slices.Concat(g.text(), g.half(), g.random(ChunkSize), known)
	put, after := g.text(), g.text()
	w := s.NewWriter()
	w.StoreRaw(true)
	ids, err := writeStream(w, streamed)
	var putID, afterID ID
	if err == nil {
		putID, err = w.Put(put)
	}
	if err == nil {
		w.StoreRaw(false)
		afterID, err = w.Put(after)
	}
	if err != nil {
		w.Abort()
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if st := w.Stats(); st.NewChunks != 5 || st.NewStored != 4*ChunkSize+int64(len(s2Len(after))) || st.ReusedChunk != 1 {
		t.Errorf("stats %+v: want 5 new chunks, 4 of them raw, and 1 reused", st)
	}
	tests := []struct {
		name string
		id   ID
		data []byte
		want Codec
		// framed: compressible, in a pack of several, so Compact puts
		// it in a zstd frame
		framed bool
	}{
		{"streamed text", ids[0], streamed[:ChunkSize], CodecRaw, true},
		{"streamed half", ids[1], streamed[ChunkSize : 2*ChunkSize], CodecRaw, true},
		{"streamed random", ids[2], streamed[2*ChunkSize : 3*ChunkSize], CodecRaw, false},
		{"already stored", ids[3], known, CodecS2, false},
		{"put", putID, put, CodecRaw, true},
		{"put after StoreRaw(false)", afterID, after, CodecS2, true},
	}
	if ids[3] != knownIDs[0] {
		t.Fatalf("the known chunk has id %s, stored as %s", ids[3].Short(), knownIDs[0].Short())
	}
	for _, tt := range tests {
		loc, err := s.Lookup(tt.id)
		if err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if loc.Codec != tt.want {
			t.Errorf("%s: codec %v, want %v", tt.name, loc.Codec, tt.want)
		}
		if loc.Codec == CodecRaw && loc.Stored != ChunkSize {
			t.Errorf("%s: raw chunk stored in %d bytes", tt.name, loc.Stored)
		}
		checkReadable(t, s, []ID{tt.id}, [][]byte{tt.data})
	}

	if _, err := s.Compact(context.Background(), CompactOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		loc, err := s.Lookup(tt.id)
		if err != nil {
			t.Fatalf("%s, compacted: %v", tt.name, err)
		}
		if tt.framed && loc.Codec != CodecZstd {
			t.Errorf("%s, compacted: codec %v, want zstd", tt.name, loc.Codec)
		}
		checkReadable(t, s, []ID{tt.id}, [][]byte{tt.data})
	}
}
