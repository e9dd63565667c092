package cas

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// rewriteIndex replaces the store's index with one segment of the entries
// edit returns, given every entry in id order.
func rewriteIndex(t testing.TB, s *Store, edit func([]indexEntry) []indexEntry) {
	t.Helper()
	x := s.idx
	if err := x.waitMerges(); err != nil {
		t.Fatal(err)
	}
	var entries []indexEntry
	if err := x.forEach(context.Background(), func(e *indexEntry) error {
		entries = append(entries, *e)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	g, err := x.writeSegment(edit(entries))
	if err != nil {
		t.Fatal(err)
	}
	x.mu.Lock()
	old := x.segs
	x.segs = []*segment{g}
	x.mu.Unlock()
	for _, o := range old {
		if err := os.Remove(o.path); err != nil {
			t.Fatal(err)
		}
		o.release()
	}
}

// segmentFiles lists the segment files in the store's index folder.
func segmentFiles(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "index"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if _, ok := parseSegmentName(e.Name()); ok {
			names = append(names, filepath.Join(dir, "index", e.Name()))
		}
	}
	return names
}

// ingestPacks writes n small Writers' worth of random chunks, each sealing
// its own pack, and returns the data and ids of each.
func ingestPacks(t testing.TB, s *Store, g *gen, n, chunks int) ([][]byte, [][]ID) {
	t.Helper()
	var datas [][]byte
	var idss [][]ID
	for range n {
		data := g.random(chunks * ChunkSize)
		ids, _ := ingest(t, s, data)
		datas, idss = append(datas, data), append(idss, ids)
	}
	return datas, idss
}

// TestIndexMerges seals many packs: the segments merge in the background
// into a few, and every chunk stays found, before and after a reopen.
func TestIndexMerges(t *testing.T) {
	g := newGen(74)
	dir := t.TempDir()
	s := openStore(t, dir)
	const packs = 40
	datas, idss := ingestPacks(t, s, g, packs, 3)
	if err := s.idx.waitMerges(); err != nil {
		t.Fatal(err)
	}
	// Powers of two of entries decrease from the oldest segment to the newest.
	if n := len(segmentFiles(t, dir)); n > 6 {
		t.Errorf("%d segments for %d packs after merging", n, packs)
	}
	for i := range datas {
		checkReadable(t, s, idss[i], chunksOf(datas[i]))
	}
	st, err := s.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Chunks != packs*3 || st.Packs != packs {
		t.Errorf("stats %+v, want %d packs of 3 chunks", st, packs)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	if s.Rebuilt || len(s.Damaged) != 0 {
		t.Errorf("reopen: Rebuilt %v, Damaged %q", s.Rebuilt, s.Damaged)
	}
	for i := range datas {
		checkReadable(t, s, idss[i], chunksOf(datas[i]))
	}
	checkVerify(t, s)
}

// TestIndexAfterGC checks that GC's removals leave the index: the dead
// entries are gone from lookups at once and from the files after merging.
func TestIndexAfterGC(t *testing.T) {
	g := newGen(75)
	dir := t.TempDir()
	s := openStore(t, dir)
	datas, idss := ingestPacks(t, s, g, 8, 4)
	live := idSet(idss[0], idss[3])
	if _, err := s.GC(context.Background(), func(id ID) bool { return live[id] }, GCOptions{}); err != nil {
		t.Fatal(err)
	}
	for i := range datas {
		if i == 0 || i == 3 {
			checkReadable(t, s, idss[i], chunksOf(datas[i]))
			continue
		}
		for _, id := range idss[i] {
			if s.Has(id) {
				t.Fatalf("collected chunk %s still indexed", id.Short())
			}
		}
	}
	if err := s.idx.waitMerges(); err != nil {
		t.Fatal(err)
	}
	var entries int
	for _, g := range s.idx.segs {
		entries += g.n
	}
	if entries != 8 {
		t.Errorf("segments hold %d entries after merging, want the 8 live ones", entries)
	}
	checkVerify(t, s)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	checkReadable(t, s, idss[3], chunksOf(datas[3]))
	checkVerify(t, s)
}

// TestIndexSegmentDamage spoils the segment files of a closed store: Open
// must notice, set the damage aside and rebuild from the pack footers.
func TestIndexSegmentDamage(t *testing.T) {
	g := newGen(76)
	tests := []struct {
		name    string
		spoil   func(t *testing.T, paths []string)
		rebuilt bool
	}{
		{"byte flipped in an entry", func(t *testing.T, paths []string) { flipByte(t, paths[0], segHeaderSize+5) }, true},
		{"byte flipped in the trailer", func(t *testing.T, paths []string) {
			fi, _ := os.Stat(paths[0])
			flipByte(t, paths[0], fi.Size()-3)
		}, true},
		{"truncated", func(t *testing.T, paths []string) {
			if err := os.Truncate(paths[0], 100); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"emptied", func(t *testing.T, paths []string) {
			if err := os.Truncate(paths[0], 0); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"replaced by garbage", func(t *testing.T, paths []string) {
			if err := os.WriteFile(paths[0], newGen(99).random(5000), 0o600); err != nil {
				t.Fatal(err)
			}
		}, true},
		// Missing segments are a crash before they were written: rebuilt
		// quietly, as a pack sealed but not indexed.
		{"all removed", func(t *testing.T, paths []string) {
			for _, p := range paths {
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
			}
		}, false},
		{"folder removed", func(t *testing.T, paths []string) {
			if err := os.RemoveAll(filepath.Dir(paths[0])); err != nil {
				t.Fatal(err)
			}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			datas, idss := ingestPacks(t, s, g, 3, 5)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			paths := segmentFiles(t, dir)
			if len(paths) == 0 {
				t.Fatal("no segment files")
			}
			tt.spoil(t, paths)
			s = openStore(t, dir)
			if s.Rebuilt != tt.rebuilt || len(s.Damaged) != 0 {
				t.Errorf("Rebuilt %v (want %v), Damaged %q", s.Rebuilt, tt.rebuilt, s.Damaged)
			}
			for i := range datas {
				checkReadable(t, s, idss[i], chunksOf(datas[i]))
			}
			checkVerify(t, s)
		})
	}
}

// TestIndexCrashStates builds, by hand, what a kill -9 leaves at each step
// of the write orders, and checks that Open makes a consistent store of it.
func TestIndexCrashStates(t *testing.T) {
	g := newGen(77)
	tests := []struct {
		name  string
		crash func(t *testing.T, dir string, s *Store)
		// segs is how many segment files Open leaves, when the test says.
		segs int
	}{
		{name: "pack sealed, no segment, no record", crash: func(t *testing.T, dir string, s *Store) {
			loc, _ := s.Lookup(lastID(s, t))
			removeSegmentsOf(t, s, loc.Pack)
			dropRecord(t, s, loc.Pack)
		}},
		{name: "segment written, no record", crash: func(t *testing.T, dir string, s *Store) {
			loc, _ := s.Lookup(lastID(s, t))
			dropRecord(t, s, loc.Pack)
		}},
		{name: "record written, no segment", crash: func(t *testing.T, dir string, s *Store) {
			loc, _ := s.Lookup(lastID(s, t))
			removeSegmentsOf(t, s, loc.Pack)
		}},
		{"merge installed, inputs not removed", func(t *testing.T, dir string, s *Store) {
			// The four packs merged into one segment, named for the last
			// input; put back per-pack inputs with the earlier numbers.
			mergeAll(t, s)
			merged := segmentFiles(t, dir)
			if len(merged) != 1 {
				t.Fatalf("%d segments after merging 4 packs", len(merged))
			}
			last, _ := parseSegmentName(filepath.Base(merged[0]))
			byPack := map[uint32][]indexEntry{}
			_ = s.idx.forEach(context.Background(), func(e *indexEntry) error {
				byPack[e.Loc.Pack] = append(byPack[e.Loc.Pack], *e)
				return nil
			})
			for p, entries := range byPack {
				if uint64(p) >= last {
					continue
				}
				g, err := s.idx.writeSegment(entries)
				if err != nil {
					t.Fatal(err)
				}
				g.release()
				if err := os.Rename(g.path, filepath.Join(dir, "index", segmentName(uint64(p)))); err != nil {
					t.Fatal(err)
				}
			}
		}, 1},
		{name: "unfinished segment", crash: func(t *testing.T, dir string, s *Store) {
			if err := os.WriteFile(filepath.Join(dir, "index", "seg-123.tmp"), []byte("half"), 0o600); err != nil {
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
			datas, idss := ingestPacks(t, s, g, 4, 3)
			if err := s.idx.waitMerges(); err != nil {
				t.Fatal(err)
			}
			tt.crash(t, dir, s)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			if len(s.Damaged) != 0 {
				t.Errorf("Damaged %q", s.Damaged)
			}
			if n := len(segmentFiles(t, dir)); tt.segs > 0 && n != tt.segs {
				t.Errorf("%d segment files after Open, want %d", n, tt.segs)
			}
			for i := range datas {
				checkReadable(t, s, idss[i], chunksOf(datas[i]))
			}
			checkVerify(t, s)
			for _, name := range segmentFiles(t, dir) {
				if strings.HasSuffix(name, ".tmp") {
					t.Errorf("%s left", name)
				}
			}
			st, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if st.Packs != 4 || st.Chunks != 12 {
				t.Errorf("stats %+v, want 4 packs of 3 chunks", st)
			}
			// New packs take new numbers.
			ids, _ := ingest(t, s, g.random(ChunkSize))
			if loc, _ := s.Lookup(ids[0]); loc.Pack < 4 {
				t.Errorf("new pack numbered %d", loc.Pack)
			}
		})
	}
}

// mergeAll merges every segment of the store into one.
func mergeAll(t testing.TB, s *Store) {
	t.Helper()
	x := s.idx
	if err := x.waitMerges(); err != nil {
		t.Fatal(err)
	}
	x.mu.RLock()
	run := slices.Clone(x.segs)
	x.mu.RUnlock()
	if len(run) < 2 {
		return
	}
	for _, g := range run {
		g.hold()
	}
	if err := x.merge(run); err != nil {
		t.Fatal(err)
	}
}

// lastID returns the id of a chunk in the store's highest pack.
func lastID(s *Store, t *testing.T) ID {
	t.Helper()
	var best ID
	var pack int64 = -1
	if err := s.ForEach(func(id ID, loc Location) error {
		if int64(loc.Pack) > pack {
			best, pack = id, int64(loc.Pack)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return best
}

// removeSegmentsOf rewrites the index without pack's entries.
func removeSegmentsOf(t *testing.T, s *Store, pack uint32) {
	t.Helper()
	rewriteIndex(t, s, func(entries []indexEntry) []indexEntry {
		return slices.DeleteFunc(entries, func(e indexEntry) bool { return e.Loc.Pack == pack })
	})
}

// dropRecord removes pack's record from index.db, leaving its segment.
func dropRecord(t *testing.T, s *Store, pack uint32) {
	t.Helper()
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPacks).Delete(packKey(pack)) }); err != nil {
		t.Fatal(err)
	}
}

// TestVerifyFindsSegmentDamage spoils a segment file under an open store:
// Verify names it, and the next Open rebuilds it.
func TestVerifyFindsSegmentDamage(t *testing.T) {
	g := newGen(80)
	dir := t.TempDir()
	s := openStore(t, dir)
	datas, idss := ingestPacks(t, s, g, 2, 4)
	if err := s.idx.waitMerges(); err != nil {
		t.Fatal(err)
	}
	paths := segmentFiles(t, dir)
	fi, err := os.Stat(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	flipByte(t, paths[0], fi.Size()-segTrailerSize-1)
	res, err := s.Verify(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Damaged) != 1 || !strings.Contains(res.Damaged[0].Reason, "checksum") || !strings.HasPrefix(res.Damaged[0].Pack, "index/seg-") {
		t.Fatalf("Verify found %v, want the segment's checksum", res.Damaged)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	if !s.Rebuilt {
		t.Error("Rebuilt = false")
	}
	for i := range datas {
		checkReadable(t, s, idss[i], chunksOf(datas[i]))
	}
	checkVerify(t, s)
}

// TestEvictLeavesIndex checks that an evicted pack's chunks are not found.
func TestEvictLeavesIndex(t *testing.T) {
	g := newGen(78)
	s := openStore(t, t.TempDir())
	datas, idss := ingestPacks(t, s, g, 2, 3)
	loc, err := s.Lookup(idss[1][0])
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Evict([]uint32{loc.Pack}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lookup(idss[1][0]); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("evicted chunk: %v", err)
	}
	if _, err := s.LookupMany(idss[1]); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("LookupMany of evicted chunks: %v", err)
	}
	checkReadable(t, s, idss[0], chunksOf(datas[0]))
	// Stored again, it is found in its new pack.
	ids, _ := ingest(t, s, datas[1])
	if !slices.Equal(ids, idss[1]) {
		t.Fatal("ids differ")
	}
	checkReadable(t, s, ids, chunksOf(datas[1]))
	if !bytes.Equal(datas[1][:ChunkSize], chunksOf(datas[1])[0]) {
		t.Fatal("data differs")
	}
	checkVerify(t, s)
}

func TestPackSet(t *testing.T) {
	tests := []struct {
		name string
		in   []uint32
		out  []uint32 // set, then removed
	}{
		{"small", []uint32{0, 1, 63, 64, 1000}, []uint32{63}},
		{"far", []uint32{maxPackBitmap, 1<<32 - 1}, []uint32{maxPackBitmap}},
		{"both", []uint32{5, maxPackBitmap - 1, maxPackBitmap + 5}, []uint32{5, maxPackBitmap + 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var p packSet
			for _, n := range tt.in {
				p.set(n, true)
			}
			for _, n := range tt.out {
				p.set(n, false)
			}
			c := p.clone()
			p.set(2, true) // the clone does not see later changes
			for _, n := range tt.in {
				want := !slices.Contains(tt.out, n)
				if p.has(n) != want || c.has(n) != want {
					t.Errorf("pack %d: has %v, clone %v, want %v", n, p.has(n), c.has(n), want)
				}
			}
			if c.has(2) && !slices.Contains(tt.in, 2) {
				t.Error("clone changed with its original")
			}
			if len(p.bits) > maxPackBitmap/64 {
				t.Errorf("bitmap of %d words", len(p.bits))
			}
		})
	}
}
