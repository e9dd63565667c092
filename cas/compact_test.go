package cas

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

// testChunks makes n unique chunks of a kind: "text" (compressible),
// "random" (not), "half", or "mixed" (the three in turn).
func testChunks(g *gen, kind string, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		k := kind
		if k == "mixed" {
			k = []string{"text", "random", "half"}[i%3]
		}
		switch k {
		case "text":
			out[i] = g.text()
		case "random":
			out[i] = g.random(ChunkSize)
		default:
			out[i] = g.half()
		}
	}
	return out
}

// ingestChunks stores chunks with one Writer and returns their ids.
func ingestChunks(t testing.TB, s *Store, chunks [][]byte) []ID {
	t.Helper()
	ids, _ := ingest(t, s, bytes.Join(chunks, nil))
	return ids
}

func TestZstdFrameRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kind   string
		frames []int // chunks per frame; 0 is a lone s2-or-raw chunk
	}{
		{"one chunk frame", "text", []int{1}},
		{"full frame", "text", []int{MaxFrameChunks}},
		{"frame with random chunks", "mixed", []int{6}},
		{"frames and lone chunks", "mixed", []int{0, 4, 0, 0, 17, 1, 0}},
		{"half chunks", "half", []int{2, 9}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			packs := filepath.Join(dir, "packs")
			if err := os.MkdirAll(packs, 0o700); err != nil {
				t.Fatal(err)
			}
			g := newGen(7)
			p, err := newPackWriterFlags(packs, 0, packCompacted)
			if err != nil {
				t.Fatal(err)
			}
			var all [][]byte
			for _, n := range tc.frames {
				if n == 0 {
					c := testChunks(g, tc.kind, 1)[0]
					stored, codec := encodeForTest(c)
					if _, err := p.add(Sum(c), stored, codec); err != nil {
						t.Fatal(err)
					}
					all = append(all, c)
					continue
				}
				chunks := testChunks(g, tc.kind, n)
				ids := make([]ID, n)
				for i, c := range chunks {
					ids[i] = Sum(c)
				}
				frame, err := encodeFrame(bytes.Join(chunks, nil), nil)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := p.addFrame(ids, frame); err != nil {
					t.Fatal(err)
				}
				all = append(all, chunks...)
			}
			path, _, err := p.seal()
			if err != nil {
				t.Fatal(err)
			}
			// The footer alone decodes every chunk.
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			entries, _, err := readFooter(f)
			if err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			for i, e := range entries {
				got, err := Unpack(e, data[e.Offset:e.Offset+e.Stored], nil)
				if err != nil || !bytes.Equal(got, all[i]) {
					t.Fatalf("Unpack(entry %d, %v slot %d of %d): %v", i, e.Codec, e.Slot, e.Frame, err)
				}
			}
			// A store opened on the pack indexes and reads it.
			s := openStore(t, dir)
			ids := make([]ID, len(all))
			for i, c := range all {
				ids[i] = Sum(c)
			}
			checkReadable(t, s, ids, all)
			got := make([]byte, len(ids)*ChunkSize)
			if err := s.GetMany(ids, got); err != nil || !bytes.Equal(got, bytes.Join(all, nil)) {
				t.Fatalf("GetMany: %v", err)
			}
			checkVerify(t, s)
		})
	}
}

func TestLocationRoundTrip(t *testing.T) {
	for _, loc := range []Location{
		{Pack: 3, Offset: 16, Stored: 100, Codec: CodecS2},
		{Pack: 3, Offset: 16, Stored: ChunkSize, Codec: CodecRaw},
		{Pack: 9, Offset: 1 << 30, Stored: 70000, Codec: CodecZstd, Slot: 200, Frame: 255},
		{Pack: 9, Offset: 16, Stored: 10, Codec: CodecZstd, Slot: 0, Frame: 1},
	} {
		got, err := DecodeLocation(loc.marshal())
		if err != nil || got != loc {
			t.Errorf("DecodeLocation(marshal(%+v)) = %+v, %v", loc, got, err)
		}
	}
	for _, bad := range []Location{
		{Pack: 1, Offset: 16, Stored: 10, Codec: CodecZstd, Slot: 1, Frame: 1},
		{Pack: 1, Offset: 16, Stored: 2 * ChunkSize, Codec: CodecZstd, Slot: 0, Frame: 2},
		{Pack: 1, Offset: 16, Stored: 10, Codec: CodecZstd, Slot: 0, Frame: 0},
	} {
		if _, err := DecodeLocation(bad.marshal()); !errors.Is(err, errdefs.ErrDataLoss) {
			t.Errorf("DecodeLocation(marshal(%+v)): %v, want data loss", bad, err)
		}
	}
}

func TestCompactKeepsBytes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		kind   string
		ingest []int // chunks per ingest, one pack each
		opts   CompactOptions
	}{
		{"text", "text", []int{600}, CompactOptions{}},
		{"random stays raw", "random", []int{50}, CompactOptions{}},
		{"mixed, several packs", "mixed", []int{100, 300, 7}, CompactOptions{}},
		{"small frames", "mixed", []int{100, 40}, CompactOptions{FrameChunks: 8}},
		{"one chunk frames", "text", []int{30}, CompactOptions{FrameChunks: 1, Workers: 1}},
		{"part of the packs", "text", []int{10, 10, 10}, CompactOptions{MaxPacks: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			g := newGen(3)
			var all [][]byte
			var ids []ID
			for _, n := range tc.ingest {
				chunks := testChunks(g, tc.kind, n)
				ids = append(ids, ingestChunks(t, s, chunks)...)
				all = append(all, chunks...)
			}
			before, err := s.Stats()
			if err != nil {
				t.Fatal(err)
			}
			st, err := s.Compact(context.Background(), tc.opts)
			if err != nil {
				t.Fatalf("Compact: %v", err)
			}
			wantPacks := len(tc.ingest)
			if tc.opts.MaxPacks > 0 {
				wantPacks = tc.opts.MaxPacks
			}
			if st.PacksCompacted != wantPacks || st.PacksLeft != len(tc.ingest)-wantPacks {
				t.Fatalf("compacted %d packs, %d left; want %d", st.PacksCompacted, st.PacksLeft, wantPacks)
			}
			if st.BytesAfter > st.BytesBefore {
				t.Errorf("compaction grew the packs: %d to %d bytes", st.BytesBefore, st.BytesAfter)
			}
			checkReadable(t, s, ids, all)
			got := make([]byte, len(ids)*ChunkSize)
			if err := s.GetMany(ids, got); err != nil || !bytes.Equal(got, bytes.Join(all, nil)) {
				t.Fatalf("GetMany after Compact: %v", err)
			}
			res := checkVerify(t, s)
			if res.Chunks != before.Chunks {
				t.Fatalf("Verify counts %d chunks, want %d", res.Chunks, before.Chunks)
			}
			// Nothing is compacted twice; the rest is compacted next.
			again, err := s.Compact(context.Background(), CompactOptions{})
			if err != nil || again.PacksCompacted != len(tc.ingest)-wantPacks {
				t.Fatalf("second Compact: %+v, %v", again, err)
			}
			// Reopened, the store reads the same bytes.
			s.Close()
			s = openStore(t, dir)
			checkReadable(t, s, ids, all)
		})
	}
}

// frameOf returns the location of a chunk in a zstd frame, failing if none.
func frameOf(t *testing.T, s *Store, ids []ID) Location {
	t.Helper()
	for _, id := range ids {
		loc, err := s.Lookup(id)
		if err != nil {
			t.Fatal(err)
		}
		if loc.Codec == CodecZstd && loc.Frame > 2 {
			return loc
		}
	}
	t.Fatal("no chunk in a zstd frame")
	return Location{}
}

func TestCompactCorruptFrameDetected(t *testing.T) {
	for _, tc := range []struct {
		name string
		at   func(loc Location) int64 // byte to flip
	}{
		{"frame header", func(l Location) int64 { return int64(l.Offset) }},
		{"frame middle", func(l Location) int64 { return int64(l.Offset) + int64(l.Stored)/2 }},
		{"frame end", func(l Location) int64 { return int64(l.Offset) + int64(l.Stored) - 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			all := testChunks(newGen(5), "text", 64)
			ids := ingestChunks(t, s, all)
			if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 16}); err != nil {
				t.Fatal(err)
			}
			loc := frameOf(t, s, ids)
			flipByte(t, s.packPath(loc.Pack), tc.at(loc))
			s.frames = frameCache{} // forget the frames decoded so far
			var damaged int
			buf := make([]byte, ChunkSize)
			for i, id := range ids {
				got, err := s.Get(id, buf)
				switch {
				case errors.Is(err, errdefs.ErrDataLoss):
					damaged++
				case err != nil:
					t.Fatalf("Get(chunk %d): %v", i, err)
				case !bytes.Equal(got, all[i]):
					t.Fatalf("Get(chunk %d) returned wrong bytes", i)
				}
			}
			if damaged == 0 {
				t.Fatal("no read reported the damaged frame")
			}
			res, err := s.Verify(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Damaged) == 0 {
				t.Fatal("Verify found no damage")
			}
		})
	}
}

func TestCompactLeavesDamagedPack(t *testing.T) {
	s := openStore(t, t.TempDir())
	g := newGen(9)
	bad := testChunks(g, "text", 20)
	good := testChunks(g, "text", 20)
	badIDs := ingestChunks(t, s, bad)
	goodIDs := ingestChunks(t, s, good)
	loc, err := s.Lookup(badIDs[3])
	if err != nil {
		t.Fatal(err)
	}
	flipByte(t, s.packPath(loc.Pack), int64(loc.Offset)+int64(loc.Stored)/2)
	st, err := s.Compact(context.Background(), CompactOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.PacksCompacted != 1 || st.PacksSkipped != 1 || len(st.Skipped) != 1 {
		t.Fatalf("Compact: %+v, want one pack compacted and the damaged one skipped", st)
	}
	checkReadable(t, s, goodIDs, good)
	if _, err := s.Get(badIDs[3], nil); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("Get(damaged chunk): %v", err)
	}
	checkReadable(t, s, badIDs[4:], bad[4:])
}

func TestCompactCrash(t *testing.T) {
	errStop := errors.New("stopped")
	for _, phase := range []string{"sealed", "switched", "removed", "forgotten"} {
		t.Run(phase, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			g := newGen(11)
			var all [][]byte
			var ids []ID
			for range 3 {
				chunks := testChunks(g, "mixed", 90)
				ids = append(ids, ingestChunks(t, s, chunks)...)
				all = append(all, chunks...)
			}
			compactStop = func(p string) error {
				if p == phase {
					return errStop
				}
				return nil
			}
			_, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 32})
			compactStop = nil
			if !errors.Is(err, errStop) {
				t.Fatalf("Compact stopped at %s: %v", phase, err)
			}
			// The process dies here: nothing after the phase runs.
			s.Close()
			s = openStore(t, dir)
			checkReadable(t, s, ids, all)
			checkVerify(t, s)
			// Compaction finishes what is left, and GC drops the copies a
			// stop before the index switch left behind.
			if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 32}); err != nil {
				t.Fatal(err)
			}
			live := idSet(ids)
			if _, err := s.GC(context.Background(), func(id ID) bool { return live[id] }, GCOptions{}); err != nil {
				t.Fatal(err)
			}
			checkReadable(t, s, ids, all)
			checkVerify(t, s)
			nums, err := s.listPacks(false)
			if err != nil {
				t.Fatal(err)
			}
			for _, num := range nums {
				flags, err := s.packFlags(num)
				if err != nil || flags&packCompacted == 0 {
					t.Errorf("%s left uncompacted (flags %d, %v)", packName(num), flags, err)
				}
			}
		})
	}
}

func TestGCMovesFramedChunks(t *testing.T) {
	s := openStore(t, t.TempDir())
	all := testChunks(newGen(13), "text", 100)
	ids := ingestChunks(t, s, all)
	if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 10}); err != nil {
		t.Fatal(err)
	}
	// Keep every third chunk: most of each frame is garbage.
	live := map[ID]bool{}
	var keep []ID
	var want [][]byte
	for i := 0; i < len(ids); i += 3 {
		live[ids[i]] = true
		keep, want = append(keep, ids[i]), append(want, all[i])
	}
	st, err := s.GC(context.Background(), func(id ID) bool { return live[id] }, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.ChunksMoved != int64(len(keep)) {
		t.Fatalf("GC moved %d chunks, want %d", st.ChunksMoved, len(keep))
	}
	checkReadable(t, s, keep, want)
	checkVerify(t, s)
	// The moved chunks are compacted again.
	if cs, err := s.Compact(context.Background(), CompactOptions{}); err != nil || cs.PacksCompacted != 1 {
		t.Fatalf("Compact after GC: %+v, %v", cs, err)
	}
	checkReadable(t, s, keep, want)
}

func TestPackedFooter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string, size, footerOff int64)
	}{
		{"intact", nil},
		{"footer byte flipped", func(t *testing.T, path string, size, footerOff int64) {
			flipByte(t, path, footerOff+(size-trailerSize-footerOff)/2)
		}},
		{"trailer byte flipped", func(t *testing.T, path string, size, _ int64) {
			flipByte(t, path, size-trailerSize+1)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			all := testChunks(newGen(17), "mixed", 300)
			ids := ingestChunks(t, s, all)
			if _, err := s.Compact(context.Background(), CompactOptions{FrameChunks: 20}); err != nil {
				t.Fatal(err)
			}
			nums, err := s.listPacks(false)
			if err != nil || len(nums) != 1 {
				t.Fatalf("packs %v, %v; want one", nums, err)
			}
			f, entries, err := s.OpenPack(nums[0])
			if err != nil {
				t.Fatal(err)
			}
			fi, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			tail, err := PackTail(f, entries, fi.Size())
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			if got := int64(len(tail)); got >= int64(len(entries))*entrySize {
				t.Errorf("packed footer of %d entries takes %d bytes, no less than unpacked", len(entries), got)
			}
			again, err := DecodeFooter(tail, fi.Size())
			if err != nil || len(again) != len(entries) {
				t.Fatalf("DecodeFooter(PackTail): %d entries, %v; want %d", len(again), err, len(entries))
			}
			for i := range entries {
				if again[i] != entries[i] {
					t.Fatalf("entry %d: %+v, want %+v", i, again[i], entries[i])
				}
			}
			if tc.damage == nil {
				return
			}
			s.Close()
			path := filepath.Join(dir, "packs", packName(nums[0]))
			tc.damage(t, path, fi.Size(), fi.Size()-int64(len(tail)))
			if err := os.Remove(filepath.Join(dir, "index.db")); err != nil {
				t.Fatal(err)
			}
			s = openStore(t, dir)
			if len(s.Damaged) != 1 {
				t.Fatalf("rebuilt index names damaged packs %v, want the one", s.Damaged)
			}
			if _, err := s.Get(ids[0], nil); !errors.Is(err, errdefs.ErrNotFound) {
				t.Fatalf("Get from a pack with a damaged footer: %v, want not found", err)
			}
		})
	}
}

func TestUnpackFramesDecodeOnce(t *testing.T) {
	s := openStore(t, t.TempDir())
	all := testChunks(newGen(19), "text", 200)
	ingestChunks(t, s, all)
	if _, err := s.Compact(context.Background(), CompactOptions{}); err != nil {
		t.Fatal(err)
	}
	nums, err := s.listPacks(false)
	if err != nil || len(nums) != 1 {
		t.Fatalf("packs %v, %v", nums, err)
	}
	f, entries, err := s.OpenPack(nums[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	// Unpack each chunk from the pack's bytes, as a remote pull does, and
	// store it in a second store, as PutStored does.
	other := openStore(t, t.TempDir())
	w := other.NewWriter()
	for _, e := range entries {
		stored := data[e.Offset : e.Offset+e.Stored]
		if _, err := Unpack(e, stored, nil); err != nil {
			t.Fatal(err)
		}
		if err := w.PutStored(e, stored); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	ids := make([]ID, len(all))
	for i, c := range all {
		ids[i] = Sum(c)
	}
	checkReadable(t, other, ids, all)
	allocs := testing.AllocsPerRun(10, func() {
		e := entries[len(entries)/2]
		if _, err := Unpack(e, data[e.Offset:e.Offset+e.Stored], make([]byte, ChunkSize)); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 2 {
		t.Errorf("Unpack of a frame just decoded allocates %v times: it decodes again", allocs)
	}
}

// TestMoves checks that Store.Moves counts the index switches that moved
// chunks (compaction, GC) and nothing else: an ingest, or a compaction or
// GC with nothing to do, leaves it.
func TestMoves(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	g := newGen(5)
	keep := ingestChunks(t, s, testChunks(g, "text", 300))
	drop := ingestChunks(t, s, testChunks(g, "text", 40))
	if n := s.Moves(); n != 0 {
		t.Fatalf("Moves %d after ingests alone", n)
	}
	if _, err := s.Compact(ctx, CompactOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := s.Moves(); n != 1 {
		t.Fatalf("Moves %d after a compaction, want 1", n)
	}
	if _, err := s.Compact(ctx, CompactOptions{}); err != nil {
		t.Fatal(err)
	}
	if n := s.Moves(); n != 1 {
		t.Fatalf("Moves %d after a compaction with nothing left to do, want 1", n)
	}
	dropped := map[ID]bool{}
	for _, id := range drop {
		dropped[id] = true
	}
	if _, err := s.GC(ctx, func(id ID) bool { return !dropped[id] }, GCOptions{Threshold: 0.01}); err != nil {
		t.Fatal(err)
	}
	if n := s.Moves(); n != 2 {
		t.Fatalf("Moves %d after a GC that removed chunks, want 2", n)
	}
	if _, err := s.Get(keep[0], nil); err != nil {
		t.Fatal(err)
	}
}

// TestCompactKeep compacts with CompactOptions.Keep naming some chunks:
// they move to the new packs as they were stored, one by one, while the
// others around them go into frames; every chunk reads back.
func TestCompactKeep(t *testing.T) {
	for _, tc := range []struct {
		name string
		keep func(i int) bool // of the chunks' index
	}{
		{"every tenth", func(i int) bool { return i%10 == 0 }},
		{"a run in the middle", func(i int) bool { return i >= 100 && i < 140 }},
		{"none", func(int) bool { return false }},
		{"all", func(int) bool { return true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			chunks := testChunks(newGen(9), "text", 300)
			ids := ingestChunks(t, s, chunks)
			kept := map[ID]bool{}
			for i, id := range ids {
				if tc.keep(i) {
					kept[id] = true
				}
			}
			st, err := s.Compact(context.Background(), CompactOptions{Keep: func(id ID) bool { return kept[id] }})
			if err != nil {
				t.Fatal(err)
			}
			if st.ChunksKept != int64(len(kept)) {
				t.Errorf("ChunksKept %d, want %d", st.ChunksKept, len(kept))
			}
			for i, id := range ids {
				loc, err := s.Lookup(id)
				if err != nil {
					t.Fatal(err)
				}
				if framed := loc.Codec == CodecZstd; framed == kept[id] {
					t.Fatalf("chunk %d (kept %v) is stored %s after the compaction", i, kept[id], loc.Codec)
				}
			}
			checkReadable(t, s, ids, chunks)
			checkVerify(t, s)
		})
	}
}
