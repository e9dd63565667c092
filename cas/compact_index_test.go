package cas

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// indexedLocations returns every chunk's location as ForEach gives it.
func indexedLocations(t *testing.T, s *Store) map[ID]Location {
	t.Helper()
	locs := map[ID]Location{}
	if err := s.ForEach(func(id ID, loc Location) error {
		locs[id] = loc
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return locs
}

// writeLegacyIndex replaces the store's index with a version 1 index.db
// holding locs and the pack records recs, as a store compacted before the
// index segments had it.
func writeLegacyIndex(t *testing.T, dir string, locs map[ID]Location, recs map[uint32]packRecord, next uint32) {
	t.Helper()
	for _, p := range []string{"index", "index.db"} {
		if err := os.RemoveAll(filepath.Join(dir, p)); err != nil {
			t.Fatal(err)
		}
	}
	db, err := bolt.Open(filepath.Join(dir, "index.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		chunks, _ := tx.CreateBucket([]byte("chunks"))
		packs, _ := tx.CreateBucket(bucketPacks)
		meta, _ := tx.CreateBucket(bucketMeta)
		for id, loc := range locs {
			if err := chunks.Put(id[:], loc.marshal()); err != nil {
				return err
			}
		}
		for n, rec := range recs {
			if err := packs.Put(packKey(n), rec.marshal()); err != nil {
				return err
			}
		}
		if err := meta.Put(keyNextPack, packKey(next)); err != nil {
			return err
		}
		return meta.Put(keyVersion, binary.BigEndian.AppendUint32(nil, legacyIndexVersion))
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestCompactedIndexRebuilt compacts a store, moves some framed chunks
// with GC, and opens it again with its index segments gone, damaged, or as
// a version 1 index.db: the segments rebuilt from the pack footers (the
// compacted packs' packed ones included) give every chunk its location as
// before, frame slot and the frame's whole stored length included, and every
// chunk reads back.
func TestCompactedIndexRebuilt(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(t *testing.T, dir string, locs map[ID]Location, recs map[uint32]packRecord, next uint32)
	}{
		{"reopened", func(*testing.T, string, map[ID]Location, map[uint32]packRecord, uint32) {}},
		{"segments removed", func(t *testing.T, dir string, _ map[ID]Location, _ map[uint32]packRecord, _ uint32) {
			for _, p := range segmentFiles(t, dir) {
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"segments damaged", func(t *testing.T, dir string, _ map[ID]Location, _ map[uint32]packRecord, _ uint32) {
			for _, p := range segmentFiles(t, dir) {
				flipByte(t, p, segHeaderSize+40)
			}
		}},
		{"index removed", func(t *testing.T, dir string, _ map[ID]Location, _ map[uint32]packRecord, _ uint32) {
			for _, p := range []string{"index", "index.db"} {
				if err := os.RemoveAll(filepath.Join(dir, p)); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"legacy index", func(t *testing.T, dir string, locs map[ID]Location, recs map[uint32]packRecord, next uint32) {
			writeLegacyIndex(t, dir, locs, recs, next)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			g := newGen(41)
			var all [][]byte
			var ids []ID
			for _, n := range []int{300, 120, 40} {
				chunks := testChunks(g, "mixed", n)
				ids = append(ids, ingestChunks(t, s, chunks)...)
				all = append(all, chunks...)
			}
			// The first two ingests' packs are compacted into packs of
			// their own; the third's is left as the Writer sealed it.
			for range 2 {
				if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 60, MaxPacks: 1}); err != nil {
					t.Fatal(err)
				}
			}
			// GC drops every third chunk of the first ingest: the rest of
			// those frames moves, each chunk on its own; the second's stay.
			dead := map[ID]bool{}
			for i := 0; i < 300; i += 3 {
				dead[ids[i]] = true
			}
			if _, err := s.GC(context.Background(), func(id ID) bool { return !dead[id] }, GCOptions{Threshold: 0.2}); err != nil {
				t.Fatal(err)
			}
			var liveIDs []ID
			var liveData [][]byte
			for i, id := range ids {
				if !dead[id] {
					liveIDs, liveData = append(liveIDs, id), append(liveData, all[i])
				}
			}
			before := indexedLocations(t, s)
			framed, big := 0, 0
			for _, id := range liveIDs {
				loc, ok := before[id]
				if !ok {
					t.Fatalf("chunk %s not indexed", id)
				}
				if loc.Codec == CodecZstd && loc.Frame > 1 {
					framed++
				}
				if loc.Stored > 1<<16 {
					big++
				}
			}
			if framed == 0 {
				t.Fatal("no chunk left in a zstd frame")
			}
			recs := map[uint32]packRecord{}
			if err := s.db.View(func(tx *bolt.Tx) error {
				return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
					rec, err := decodePackRecord(v)
					recs[beUint32(k)] = rec
					return err
				})
			}); err != nil {
				t.Fatal(err)
			}
			next := s.nextPack
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}

			tc.spoil(t, dir, before, recs, next)
			s = openStore(t, dir)
			if len(s.Damaged) != 0 {
				t.Errorf("Damaged %q after reopening", s.Damaged)
			}
			after := indexedLocations(t, s)
			if len(after) != len(before) {
				t.Errorf("%d chunks indexed, want %d", len(after), len(before))
			}
			for _, id := range liveIDs {
				loc, err := s.Lookup(id)
				if err != nil {
					t.Fatalf("Lookup %s: %v", id, err)
				}
				if loc != before[id] || after[id] != before[id] {
					t.Fatalf("chunk %s at %+v (ForEach %+v), want %+v", id, loc, after[id], before[id])
				}
			}
			checkReadable(t, s, liveIDs, liveData)
			got := make([]byte, len(liveIDs)*ChunkSize)
			if err := s.GetMany(liveIDs, got); err != nil {
				t.Fatalf("GetMany: %v", err)
			}
			for i := range liveIDs {
				if string(got[i*ChunkSize:(i+1)*ChunkSize]) != string(liveData[i]) {
					t.Fatalf("GetMany: chunk %d differs", i)
				}
			}
			if res := checkVerify(t, s); res.Chunks < int64(len(liveIDs)) {
				t.Errorf("Verify counts %d chunks, want at least %d", res.Chunks, len(liveIDs))
			}
			t.Logf("%d live chunks, %d in frames, %d of frames over 64 KiB", len(liveIDs), framed, big)
		})
	}
}
