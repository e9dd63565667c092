package snapshotter

import (
	"context"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
)

func TestReport(t *testing.T) {
	for _, withParent := range []bool{true, false} {
		name := "copy over its parent"
		if !withParent {
			name = "independent copy"
		}
		t.Run(name, func(t *testing.T) { testReport(t, withParent) })
	}
}

func testReport(t *testing.T, withParent bool) {
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(20)
	const blocks = 100
	const tail = bs - 1000 // bytes in the last, partial block
	size := (blocks-1)*bs + tail
	a := randomBytes(r, size)
	clear(a[40*bs : 60*bs]) // 20 zero blocks
	b := slices.Clone(a)
	changed := []int{3, 17, 45, 70, 99} // 45 was zero, 99 is the partial tail
	for _, n := range changed {
		fillBlock(r, b, n)
	}
	clear(b[5*bs : 6*bs]) // becomes zero
	ingest(t, g, "a", "", a)
	parent := ""
	if withParent {
		parent = "a"
	}
	sb := ingest(t, g, "b", parent, b)
	mb, _ := sb.Map("disk")
	if mb.NewChunks != int64(len(changed)) || mb.ZeroChunks != 20 {
		t.Errorf("b's map: %+v, want %d new chunks and 20 zero ones", mb, len(changed))
	}

	rep, err := g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	zero := int64(40 * bs)
	referenced := int64(2*size) - zero
	unique := int64(80 + len(changed))
	if rep.Snapshots != 2 || rep.LogicalBytes != int64(2*size) || rep.ZeroBytes != zero || rep.ReferencedBytes != referenced {
		t.Errorf("totals: %d snapshots, %d logical, %d zero, %d referenced; want 2, %d, %d, %d",
			rep.Snapshots, rep.LogicalBytes, rep.ZeroBytes, rep.ReferencedBytes, 2*size, zero, referenced)
	}
	if rep.UniqueChunks != unique || rep.UniqueBytes != unique*bs {
		t.Errorf("unique: %d chunks, %d bytes; want %d", rep.UniqueChunks, rep.UniqueBytes, unique)
	}
	if rep.DedupRatio <= 1 || rep.DedupRatio != float64(referenced)/float64(unique*bs) {
		t.Errorf("dedup ratio %v, want %v", rep.DedupRatio, float64(referenced)/float64(unique*bs))
	}

	// Stored sizes, from the store itself.
	ra, _ := g.OpenMap("a", "disk")
	rb, _ := g.OpenMap("b", "disk")
	stored := func(id cas.ID) int64 {
		loc, err := g.Store().Lookup(id)
		if err != nil {
			t.Fatalf("chunk %s: %v", id, err)
		}
		return int64(loc.Stored)
	}
	var storedAll int64
	ids := map[cas.ID]bool{}
	for _, mr := range []*MapReader{ra, rb} {
		_ = mr.Each(func(_ uint64, id cas.ID) error {
			if !ids[id] {
				ids[id] = true
				storedAll += stored(id)
			}
			return nil
		})
	}
	if rep.StoredBytes != storedAll || rep.CombinedRatio != float64(referenced)/float64(storedAll) || rep.CompressionRatio != float64(unique*bs)/float64(storedAll) {
		t.Errorf("stored %d (want %d), combined %v, compression %v", rep.StoredBytes, storedAll, rep.CombinedRatio, rep.CompressionRatio)
	}

	// Exclusive chunks: a's blocks that b changed (and the one b zeroed);
	// b's new blocks.
	var exclA, exclB int64
	for _, n := range append(slices.Clone(changed), 5) {
		if id := ra.Block(uint64(n)); id != cas.ZeroID {
			exclA += stored(id)
		}
		if id := rb.Block(uint64(n)); id != cas.ZeroID {
			exclB += stored(id)
		}
	}
	newB := int64(4*bs + tail) // changed blocks, now non-zero
	per := map[string]SnapshotReport{}
	for _, s := range rep.PerSnap {
		per[s.Name] = s
	}
	wantA := SnapshotReport{Name: "a", LogicalBytes: int64(size), ZeroBytes: 20 * bs, NewBytes: int64(size) - 20*bs,
		ExclusiveChunks: 5, ExclusiveBytes: exclA}
	wantB := SnapshotReport{Name: "b", Parent: parent, LogicalBytes: int64(size), ZeroBytes: 20 * bs,
		NewBytes: newB, ReusedBytes: int64(size) - 20*bs - newB, ExclusiveChunks: 5, ExclusiveBytes: exclB}
	if !withParent {
		wantB.NewBytes, wantB.ReusedBytes = int64(size)-20*bs, 0
	}
	for _, want := range []SnapshotReport{wantA, wantB} {
		got := per[want.Name]
		if got.WrittenStoredBytes <= 0 {
			t.Errorf("%s: written stored bytes %d", want.Name, got.WrittenStoredBytes)
		}
		want.WrittenStoredBytes = got.WrittenStoredBytes
		if got != want {
			t.Errorf("per-snapshot report:\n got %+v\nwant %+v", got, want)
		}
	}
	if per["b"].WrittenStoredBytes != mb.NewStored || per["b"].WrittenStoredBytes != exclB {
		t.Errorf("b wrote %d stored bytes; its map says %d, its new chunks take %d", per["b"].WrittenStoredBytes, mb.NewStored, exclB)
	}

	// Histogram: every block of a that b kept is referenced twice.
	var histChunks int64
	byMax := map[int64]RefBucket{}
	for _, h := range rep.Histogram {
		histChunks += h.Chunks
		byMax[h.MaxRefs] = h
		if h.ReferencedBytes < h.Chunks*h.MinRefs*bs || h.ReferencedBytes > h.Chunks*h.MaxRefs*bs {
			t.Errorf("histogram row %+v: referenced bytes out of range", h)
		}
	}
	if histChunks != rep.UniqueChunks {
		t.Errorf("histogram counts sum to %d, want %d unique chunks", histChunks, rep.UniqueChunks)
	}
	if byMax[1].Chunks != 10 || byMax[2].Chunks != 75 || len(rep.Histogram) != 2 {
		t.Errorf("histogram %+v, want 10 chunks referenced once and 75 twice", rep.Histogram)
	}
	if rep.Store.Packs != 2 || rep.Store.IndexEntries != unique || rep.Store.GarbageChunks != 0 || rep.Store.GarbageBytes != 0 || rep.Store.ReclaimableBytes != 0 {
		t.Errorf("store section %+v", rep.Store)
	}

	// The report of b alone keeps the store-wide view of exclusivity.
	one, err := g.Report(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	if one.Snapshots != 1 || len(one.PerSnap) != 1 || one.PerSnap[0] != per["b"] || one.UniqueChunks != 80 {
		t.Errorf("report of b: %d snapshots, %+v, %d unique", one.Snapshots, one.PerSnap, one.UniqueChunks)
	}

	// After removing b, its chunks are garbage that gc would free.
	if err := g.Remove("b"); err != nil {
		t.Fatal(err)
	}
	rep, err = g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Store.GarbageChunks != 5 || rep.Store.GarbageBytes != exclB || rep.Store.ReclaimableBytes <= exclB {
		t.Errorf("after removing b: store %+v, want 5 garbage chunks of %d bytes", rep.Store, exclB)
	}
	st, err := g.GC(ctx, cas.GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.BytesFreed != rep.Store.ReclaimableBytes {
		t.Errorf("gc freed %d bytes; report said %d were reclaimable", st.BytesFreed, rep.Store.ReclaimableBytes)
	}
	checkExport(t, g, "a", "disk", a)
	verifyOK(t, g)
}

func TestReportEmpty(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	rep, err := g.Report(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Snapshots != 0 || rep.UniqueChunks != 0 || rep.DedupRatio != 0 || len(rep.Histogram) != 0 || len(rep.PerSnap) != 0 {
		t.Fatalf("empty report: %+v", rep)
	}
	ingest(t, g, "zeros", "", make([]byte, 3*bs))
	rep, err = g.Report(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Snapshots != 1 || rep.ZeroBytes != 3*bs || rep.ReferencedBytes != 0 || rep.UniqueChunks != 0 || rep.DedupRatio != 0 {
		t.Fatalf("report of an all-zero snapshot: %+v", rep)
	}
}
