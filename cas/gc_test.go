package cas

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

func idSet(ids ...[]ID) map[ID]bool {
	m := map[ID]bool{}
	for _, l := range ids {
		for _, id := range l {
			if id != ZeroID {
				m[id] = true
			}
		}
	}
	return m
}

func TestGC(t *testing.T) {
	g := newGen(20)
	// A and B share no chunk; each mixes raw and s2 chunks.
	mk := func(n int) []byte {
		var parts [][]byte
		for range n {
			parts = append(parts, g.random(ChunkSize), g.text(), g.half())
		}
		return bytes.Join(parts, nil)
	}
	dataA, dataB := mk(20), mk(30) // B is 60% of a shared pack
	small := mk(1)                 // 3 chunks: little garbage next to A

	type setup struct {
		dataA, dataB []byte
		separate     bool // A and B in separate packs (two Writers)
	}
	tests := []struct {
		name      string
		setup     setup
		liveA     bool
		liveB     bool
		threshold float64
		// expectations
		bGone         bool
		deleted       int
		rewritten     int
		moved         bool
		freed         bool
		packsAfterMax int
	}{
		{name: "separate packs, only A live", setup: setup{dataA, dataB, true}, liveA: true,
			bGone: true, deleted: 1, freed: true, packsAfterMax: 1},
		{name: "one pack, only A live", setup: setup{dataA, dataB, false}, liveA: true,
			bGone: true, rewritten: 1, moved: true, freed: true, packsAfterMax: 1},
		{name: "one pack, only B live", setup: setup{dataA, dataB, false}, liveB: true, threshold: 0.3,
			rewritten: 1, moved: true, freed: true, packsAfterMax: 1},
		{name: "separate packs, nothing live", setup: setup{dataA, dataB, true},
			bGone: true, deleted: 2, freed: true, packsAfterMax: 0},
		{name: "everything live", setup: setup{dataA, dataB, false}, liveA: true, liveB: true,
			packsAfterMax: 1},
		{name: "everything live, separate packs", setup: setup{dataA, dataB, true}, liveA: true, liveB: true,
			packsAfterMax: 2},
		{name: "garbage under the threshold is kept", setup: setup{dataA, small, false}, liveA: true,
			packsAfterMax: 1},
		{name: "40% garbage under the default threshold is kept", setup: setup{dataA, dataB, false}, liveB: true,
			packsAfterMax: 1},
		{name: "garbage over a low threshold is collected", setup: setup{dataA, small, false}, liveA: true, threshold: 0.01,
			bGone: true, rewritten: 1, moved: true, freed: true, packsAfterMax: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			var idsA, idsB []ID
			if tt.setup.separate {
				idsA, _ = ingest(t, s, tt.setup.dataA)
				idsB, _ = ingest(t, s, tt.setup.dataB)
			} else {
				ids, _ := ingest(t, s, append(append([]byte(nil), tt.setup.dataA...), tt.setup.dataB...))
				na := len(tt.setup.dataA) / ChunkSize
				idsA, idsB = ids[:na], ids[na:]
			}
			setA, setB := idSet(idsA), idSet(idsB)
			live := func(id ID) bool { return (tt.liveA && setA[id]) || (tt.liveB && setB[id]) }
			// Index segments merge in the background, which changes the
			// index's size: compare stores with no merge running or due.
			if err := s.idx.waitMerges(); err != nil {
				t.Fatal(err)
			}
			before, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}

			st, err := s.GC(context.Background(), live, GCOptions{Threshold: tt.threshold})
			if err != nil {
				t.Fatal(err)
			}
			if st.PacksBefore != before.Packs || st.BytesBefore != before.PackBytes {
				t.Errorf("GC saw %d packs of %d bytes, store had %d of %d", st.PacksBefore, st.BytesBefore, before.Packs, before.PackBytes)
			}
			if st.PacksDeleted != tt.deleted || st.PacksRewritten != tt.rewritten {
				t.Errorf("deleted %d, rewrote %d packs; want %d, %d", st.PacksDeleted, st.PacksRewritten, tt.deleted, tt.rewritten)
			}
			if (st.ChunksMoved > 0) != tt.moved {
				t.Errorf("moved %d chunks", st.ChunksMoved)
			}
			if (st.BytesFreed > 0) != tt.freed || st.BytesFreed != st.BytesBefore-st.BytesAfter {
				t.Errorf("freed %d bytes (%d → %d)", st.BytesFreed, st.BytesBefore, st.BytesAfter)
			}
			if st.PacksAfter > tt.packsAfterMax {
				t.Errorf("%d packs after GC, want at most %d", st.PacksAfter, tt.packsAfterMax)
			}
			if err := s.idx.waitMerges(); err != nil {
				t.Fatal(err)
			}
			after, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if after.Packs != st.PacksAfter || after.PackBytes != st.BytesAfter {
				t.Errorf("store has %d packs of %d bytes; GC says %d of %d", after.Packs, after.PackBytes, st.PacksAfter, st.BytesAfter)
			}
			if n := len(packFiles(t, s)); n != after.Packs {
				t.Errorf("%d files in packs/, index lists %d packs", n, after.Packs)
			}
			if !tt.freed && (after != before) {
				t.Errorf("GC that freed nothing changed the store: %+v → %+v", before, after)
			}

			check := func(s *Store) {
				t.Helper()
				if tt.liveA {
					checkReadable(t, s, idsA, chunksOf(tt.setup.dataA))
				}
				if tt.liveB {
					checkReadable(t, s, idsB, chunksOf(tt.setup.dataB))
				}
				if tt.bGone {
					for id := range setB {
						if _, err := s.Lookup(id); !errors.Is(err, errdefs.ErrNotFound) {
							t.Fatalf("Lookup(dead %s) = %v, want errdefs.ErrNotFound", id.Short(), err)
						}
						if _, err := s.Get(id, nil); !errors.Is(err, errdefs.ErrNotFound) {
							t.Fatalf("Get(dead %s) = %v, want errdefs.ErrNotFound", id.Short(), err)
						}
					}
				} else {
					// Dead chunks in a kept pack stay readable.
					checkReadable(t, s, idsB, chunksOf(tt.setup.dataB))
				}
				checkVerify(t, s)
			}
			check(s)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			check(s)

			// A second GC with the same live set has nothing left to do
			// unless garbage stayed under the threshold.
			st2, err := s.GC(context.Background(), live, GCOptions{Threshold: tt.threshold})
			if err != nil {
				t.Fatal(err)
			}
			if st2.BytesFreed != 0 || st2.PacksDeleted+st2.PacksRewritten != 0 {
				t.Errorf("second GC: %+v", st2)
			}
			check(s)
		})
	}
}

// TestGCAfterRepeatedIngest collects a pack whose chunks the index locates
// elsewhere (a pack sealed twice over by a crash, here forced by hand).
func TestGCDuplicatePack(t *testing.T) {
	g := newGen(21)
	dir := t.TempDir()
	data := bytes.Join([][]byte{g.random(10 * ChunkSize), g.text()}, nil)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := ingest(t, s, data)
	loc, err := s.Lookup(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "packs", packName(loc.Pack)))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "packs", packName(9)), b, 0o600); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	use, err := s.Usage(func(ID) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	if u := use[9]; u == nil || u.LiveChunks != 0 || u.Unreachable != u.ChunkBytes {
		t.Fatalf("usage of the duplicate pack: %+v", u)
	}
	st, err := s.GC(context.Background(), func(ID) bool { return true }, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.PacksDeleted != 1 || st.ChunksMoved != 0 || st.PacksAfter != 1 {
		t.Errorf("GC: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(dir, "packs", packName(9))); !os.IsNotExist(err) {
		t.Errorf("duplicate pack still there: %v", err)
	}
	checkReadable(t, s, ids, chunksOf(data))
	checkVerify(t, s)
}

// TestDeletingPackRemovedOnOpen checks the last step of GC's crash order: a
// pack marked for deletion in the index goes on the next Open.
func TestDeletingPackRemovedOnOpen(t *testing.T) {
	g := newGen(22)
	tests := []struct {
		name       string
		fileExists bool
	}{
		{"file still there", true},
		{"file already removed", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			dataA, dataB := g.random(6*ChunkSize), g.random(4*ChunkSize)
			idsA, _ := ingest(t, s, dataA)
			idsB, _ := ingest(t, s, dataB)
			locB, err := s.Lookup(idsB[0])
			if err != nil {
				t.Fatal(err)
			}
			err = s.db.Update(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketPacks).Put(packKey(locB.Pack), packRecord{State: packDeleting}.marshal())
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join(dir, "packs", packName(locB.Pack))
			if !tt.fileExists {
				if err := os.Remove(path); err != nil {
					t.Fatal(err)
				}
			}
			s = openStore(t, dir)
			if _, err := os.Stat(path); !os.IsNotExist(err) {
				t.Errorf("%s still on disk: %v", path, err)
			}
			for _, id := range idsB {
				if _, err := s.Lookup(id); !errors.Is(err, errdefs.ErrNotFound) {
					t.Fatalf("chunk of a deleted pack: %v, want errdefs.ErrNotFound", err)
				}
			}
			ss, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if ss.Packs != 1 || ss.Chunks != int64(len(idsA)) {
				t.Errorf("stats %+v, want 1 pack of %d chunks", ss, len(idsA))
			}
			checkReadable(t, s, idsA, chunksOf(dataA))
			checkVerify(t, s)
			// The number is not reused.
			idsC, _ := ingest(t, s, g.random(ChunkSize))
			if loc, _ := s.Lookup(idsC[0]); loc.Pack <= locB.Pack {
				t.Errorf("new pack %d after deleted pack %d", loc.Pack, locB.Pack)
			}
		})
	}
}

// TestGetDuringGC reads live chunks while GC moves them to new packs and
// deletes the old ones. Every Get must succeed. Run it under -race.
func TestGetDuringGC(t *testing.T) {
	g := newGen(23)
	for round := range 4 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			s := openStore(t, t.TempDir())
			dataA := g.random(64 * ChunkSize)
			dataB := g.random(192 * ChunkSize)
			ids, _ := ingest(t, s, append(append([]byte(nil), dataA...), dataB...))
			idsA := ids[:64]
			chunksA := chunksOf(dataA)
			setA := idSet(idsA)

			start := make(chan struct{})
			done := make(chan struct{})
			errs := make(chan error, 4)
			var wg sync.WaitGroup
			for r := range 4 {
				wg.Go(func() {
					buf := make([]byte, ChunkSize)
					<-start
					for n := 0; ; n++ {
						i := (n*5 + r) % len(idsA)
						got, err := s.Get(idsA[i], buf)
						if err == nil && !bytes.Equal(got, chunksA[i]) {
							err = fmt.Errorf("chunk %d: wrong bytes", i)
						}
						if err != nil {
							errs <- err
							return
						}
						select {
						case <-done:
							return
						default:
						}
					}
				})
			}
			close(start)
			st, err := s.GC(context.Background(), func(id ID) bool { return setA[id] }, GCOptions{})
			close(done)
			wg.Wait()
			close(errs)
			if err != nil {
				t.Fatal(err)
			}
			if st.PacksRewritten != 1 || st.ChunksMoved != 64 {
				t.Errorf("GC: %+v", st)
			}
			for err := range errs {
				t.Errorf("Get during GC: %v", err)
			}
			checkReadable(t, s, idsA, chunksA)
			checkVerify(t, s)
			// No file of a removed pack stays open.
			s.filesMu.RLock()
			for n := range s.files {
				if _, err := os.Stat(s.packPath(n)); err != nil {
					t.Errorf("pack %d held open after removal", n)
				}
			}
			s.filesMu.RUnlock()
		})
	}
}

func TestGCCancelled(t *testing.T) {
	g := newGen(24)
	dir := t.TempDir()
	s := openStore(t, dir)
	data := g.random(16 * ChunkSize)
	ids, _ := ingest(t, s, data)
	keep := idSet(ids[:4])
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.idx.waitMerges(); err != nil { // a merge changes the index's size
		t.Fatal(err)
	}
	before, _ := s.Stats()
	_, err := s.GC(ctx, func(id ID) bool { return keep[id] }, GCOptions{})
	wantErrIs(t, err, context.Canceled)
	after, _ := s.Stats()
	if after != before {
		t.Errorf("cancelled GC changed the store: %+v → %+v", before, after)
	}
	checkReadable(t, s, ids, chunksOf(data))
	checkVerify(t, s)
	// The write lock was released: a later GC runs.
	if _, err := s.GC(context.Background(), func(id ID) bool { return keep[id] }, GCOptions{}); err != nil {
		t.Fatal(err)
	}
	checkReadable(t, s, ids[:4], chunksOf(data)[:4])
	checkVerify(t, s)
}
