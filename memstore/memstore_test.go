package memstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// image returns pages of guest-like memory: random pages, text pages, and
// every fourth page zero.
func image(seed uint64, pages int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, pages*PageSize)
	for p := range pages {
		pg := b[p*PageSize : (p+1)*PageSize]
		switch p % 4 {
		case 0:
		case 1:
			for i := range pg {
				pg[i] = byte(r.Uint32())
			}
		default:
			copy(pg, bytes.Repeat([]byte(fmt.Sprintf("page %d seed %d ", p, seed)), PageSize))
		}
	}
	return b
}

// anon maps private anonymous memory, unmapped at the end of the test.
func anon(t testing.TB, size int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// touch reads one byte of each listed page from workers goroutines.
func touch(region []byte, pages []int, workers int) {
	runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), workers+2))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			var s int64
			for i := w; i < len(pages); i += workers {
				s += int64(region[pages[i]*PageSize+123])
			}
			sink.Add(s)
		})
	}
	wg.Wait()
}

var sink atomic.Int64

func allPages(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

func capture(t testing.TB, g *snapshotter.Graph, src []byte, opts CaptureOptions) snapshotter.Snapshot {
	t.Helper()
	s, err := Capture(context.Background(), g, bytes.NewReader(src), int64(len(src)), opts)
	if err != nil {
		t.Fatalf("Capture %s: %v", opts.Name, err)
	}
	return s
}

func start(t testing.TB, g *snapshotter.Graph, snap string, region []byte, opts Options) *Restore {
	t.Helper()
	r, err := Start(context.Background(), g, snap, "", region, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return r
}

func TestRestoreRoundTrip(t *testing.T) {
	const pages = 2048 // 8 MiB
	src := image(1, pages)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	order := allPages(pages)
	rand.New(rand.NewPCG(9, 9)).Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })

	tests := []struct {
		name        string
		faultAround int
		workers     int
		prefetch    []uint64
	}{
		{"one page per fault", 1, 1, []uint64{}},
		{"fault-around 16, 4 threads", 16, 4, []uint64{}},
		{"fault-around 64, 2 threads", 64, 2, []uint64{}},
		{"prefetch half", 16, 2, func() []uint64 {
			var p []uint64
			for _, x := range order[:pages/2] {
				p = append(p, uint64(x))
			}
			return p
		}()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			region := anon(t, len(src))
			faulted0, prefetched0 := Totals()
			r := start(t, g, "m", region, Options{FaultAround: tc.faultAround, Prefetch: tc.prefetch})
			touch(region, order, tc.workers)
			<-r.PrefetchDone()
			if !bytes.Equal(region, src) {
				t.Fatal("restored memory differs from the captured image")
			}
			if err := r.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			st := r.Stats() // after Close: the handler counts after it wakes the thread
			if st.Copied+st.Zeroed+st.Prefetched != pages {
				t.Errorf("filled %d+%d+%d pages, want %d", st.Copied, st.Zeroed, st.Prefetched, pages)
			}
			// No other restore runs in this process meanwhile.
			if faulted, prefetched := Totals(); faulted-faulted0 != st.Copied+st.Zeroed || prefetched-prefetched0 != st.Prefetched {
				t.Errorf("totals grew by %d faulted, %d prefetched; this restore filled %d and %d", faulted-faulted0, prefetched-prefetched0, st.Copied+st.Zeroed, st.Prefetched)
			}
			// A thread that a signal (Go's preemption) interrupts in a fault
			// faults again, and that message finds the page present: count
			// only the faults that filled a page.
			if filled := st.Faults - st.Repeats; tc.faultAround == 1 && len(tc.prefetch) == 0 && filled != pages {
				t.Errorf("%d faults (%d repeated) with one page per fault, want %d that fill a page", st.Faults, st.Repeats, pages)
			}
			if tc.faultAround > 1 && st.Faults >= pages {
				t.Errorf("%d faults with fault-around %d: no window was used", st.Faults, tc.faultAround)
			}
		})
	}
}

func TestRestoresDiverge(t *testing.T) {
	src := image(2, 256)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	a, b := anon(t, len(src)), anon(t, len(src))
	ra := start(t, g, "m", a, Options{Prefetch: []uint64{}})
	rb := start(t, g, "m", b, Options{Prefetch: []uint64{}})
	// Fault the pages in with plain loads first: copy() is runtime
	// assembly, and a goroutine blocked in a fault there cannot be stopped
	// for a GC, which would then wait on the handler forever (see Start).
	touch(a, allPages(256), 1)
	touch(b, allPages(256), 1)
	copy(a[5*PageSize:], "written in a")
	copy(b[7*PageSize:], "written in b")
	for _, r := range []*Restore{ra, rb} {
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
	}
	wantA, wantB := bytes.Clone(src), bytes.Clone(src)
	copy(wantA[5*PageSize:], "written in a")
	copy(wantB[7*PageSize:], "written in b")
	if !bytes.Equal(a, wantA) {
		t.Error("region a is not the image plus a's write")
	}
	if !bytes.Equal(b, wantB) {
		t.Error("region b is not the image plus b's write")
	}
}

// countingReader records which pages of src were read.
type countingReader struct {
	src  []byte
	mu   sync.Mutex
	read map[int]bool
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	for pg := off / PageSize; pg < (off+int64(len(p))+PageSize-1)/PageSize; pg++ {
		c.read[int(pg)] = true
	}
	c.mu.Unlock()
	return bytes.NewReader(c.src).ReadAt(p, off)
}

func TestIncrementalCapture(t *testing.T) {
	const pages = 4096 // 16 MiB
	src := image(3, pages)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	parent := capture(t, g, src, CaptureOptions{Name: "base"})
	if m, _ := parent.Map(DefaultMap); m.Size != int64(len(src)) || m.ZeroChunks != pages/4 {
		t.Fatalf("full capture: size %d, %d zero pages; want %d, %d", m.Size, m.ZeroChunks, len(src), pages/4)
	}

	// Dirty 1% of the pages with new random bytes.
	next := bytes.Clone(src)
	dirty := NewBitmap(pages)
	r := rand.New(rand.NewPCG(4, 4))
	for range pages / 100 {
		p := r.IntN(pages)
		dirty.Set(p)
		for i := range PageSize {
			next[p*PageSize+i] = byte(r.Uint32())
		}
	}
	cr := &countingReader{src: next, read: map[int]bool{}}
	child, err := Capture(context.Background(), g, cr, int64(len(next)), CaptureOptions{Name: "child", Parent: "base", Dirty: dirty})
	if err != nil {
		t.Fatal(err)
	}
	for p := range cr.read {
		if !dirty.Has(p) {
			t.Fatalf("capture read clean page %d", p)
		}
	}
	m, _ := child.Map(DefaultMap)
	if int(m.NewChunks) != dirty.Count() || int(m.Changed) != dirty.Count() {
		t.Errorf("incremental capture stored %d new chunks, %d changed blocks; want %d (the dirty pages)", m.NewChunks, m.Changed, dirty.Count())
	}
	region := anon(t, len(next))
	rs := start(t, g, "child", region, Options{Prefetch: []uint64{}})
	touch(region, allPages(pages), 2)
	if err := rs.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(region, next) {
		t.Fatal("restore of the incremental snapshot differs from the memory it captured")
	}

	t.Run("bad input", func(t *testing.T) {
		_, err := Capture(context.Background(), g, bytes.NewReader(next), int64(len(next)), CaptureOptions{Name: "x", Dirty: dirty})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("dirty bitmap without parent: %v, want ErrInvalidArgument", err)
		}
		_, err = Capture(context.Background(), g, bytes.NewReader(next), 100, CaptureOptions{Name: "y"})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("size not a whole number of pages: %v, want ErrInvalidArgument", err)
		}
	})
}

func TestWorkingSetPrefetch(t *testing.T) {
	const pages = 4096
	src := image(5, pages)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	// The consumer touches 10% of the pages, scattered.
	r := rand.New(rand.NewPCG(6, 6))
	set := r.Perm(pages)[:pages/10]

	first := anon(t, len(src))
	r1 := start(t, g, "m", first, Options{FaultAround: 1})
	touch(first, set, 1)
	if err := r1.SaveWorkingSet(); err != nil {
		t.Fatal(err)
	}
	if err := r1.Close(); err != nil {
		t.Fatal(err)
	}
	ws, from, err := g.WorkingSet("m", DefaultMap)
	if err != nil || from != "m" || len(ws) != len(set) {
		t.Fatalf("working set: %d pages from %q (%v); want %d from m", len(ws), from, err, len(set))
	}

	// A fork of the snapshot inherits the working set.
	capture(t, g, src, CaptureOptions{Name: "fork", Parent: "m", Dirty: NewBitmap(pages)})
	for _, snap := range []string{"m", "fork"} {
		t.Run(snap, func(t *testing.T) {
			region := anon(t, len(src))
			rs := start(t, g, snap, region, Options{FaultAround: 1})
			<-rs.PrefetchDone()
			st := rs.Stats()
			if st.Prefetched != int64(len(set)) {
				t.Errorf("prefetched %d pages, want %d", st.Prefetched, len(set))
			}
			touch(region, set, 1)
			if got := rs.Stats().Faults; got != 0 {
				t.Errorf("%d faults touching a prefetched working set, want 0", got)
			}
			touch(region, allPages(pages), 1)
			if err := rs.Close(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(region, src) {
				t.Fatal("memory with prefetch differs from the image")
			}
		})
	}
}

func TestDamagedChunk(t *testing.T) {
	const pages = 64
	src := image(7, pages)
	root := t.TempDir()
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	const victim = 33 // a random page (33 % 4 == 1)
	loc, err := g.Store().Lookup(cas.Sum(src[victim*PageSize : (victim+1)*PageSize]))
	if err != nil {
		t.Fatal(err)
	}
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "*.pack"))
	if len(packs) != 1 {
		t.Fatalf("want one pack, have %v", packs)
	}
	f, err := os.OpenFile(packs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	f.ReadAt(b[:], int64(loc.Offset)+10)
	b[0] ^= 0x40
	f.WriteAt(b[:], int64(loc.Offset)+10)
	f.Close()
	if _, err := g.Store().Get(cas.Sum(src[victim*PageSize:(victim+1)*PageSize]), nil); !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("Get of the damaged chunk: %v", err)
	}

	region := anon(t, len(src))
	rs := start(t, g, "m", region, Options{FaultAround: 1, Prefetch: []uint64{}})
	touch(region, allPages(victim), 1) // pages before the victim are fine
	faulted := make(chan any, 1)
	go func() {
		debug.SetPanicOnFault(true)
		defer func() { faulted <- recover() }()
		sink.Add(int64(region[victim*PageSize]))
	}()
	if got := <-faulted; got == nil {
		t.Fatalf("touching the damaged page returned data (restore error: %v)", rs.Err())
	}
	<-rs.Failed()
	err = rs.Close()
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("restore error %v, want errdefs.ErrDataLoss", err)
	}
}

func TestMissingSnapshotOrChunk(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	region := anon(t, 16*PageSize)
	if _, err := Start(context.Background(), g, "nope", "", region, Options{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown snapshot: %v, want ErrNotFound", err)
	}
	src := image(8, 16)
	capture(t, g, src, CaptureOptions{Name: "m"})
	if _, err := Start(context.Background(), g, "m", "", anon(t, 32*PageSize), Options{}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("region larger than the snapshot: %v, want ErrInvalidArgument", err)
	}
	// A snapshot whose chunks are gone from the store (its pack deleted):
	// the restore refuses to start rather than serve zeros.
	root := t.TempDir()
	g2 := testutil.OpenGraph(t, root, snapshotter.Open)
	capture(t, g2, src, CaptureOptions{Name: "m"})
	g2.Close()
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "*.pack"))
	for _, p := range packs {
		os.Remove(p)
	}
	g3 := testutil.OpenGraph(t, root, snapshotter.Open)
	if _, err := Start(context.Background(), g3, "m", "", anon(t, 16*PageSize), Options{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("snapshot with missing chunks: %v, want ErrNotFound", err)
	}
}

func openGraphForHandler(root string) (*snapshotter.Graph, error) { return snapshotter.Open(root) }

func TestWorkingSetRecordsWindows(t *testing.T) {
	const pages = 512
	src := image(12, pages)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	region := anon(t, len(src))
	r := start(t, g, "m", region, Options{FaultAround: 8, Prefetch: []uint64{}})
	touch(region, []int{0, 100, 506}, 1)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	var want []uint64
	for _, w := range [][2]int{{0, 8}, {100, 108}, {506, 512}} {
		for p := w[0]; p < w[1]; p++ {
			want = append(want, uint64(p))
		}
	}
	if got := r.WorkingSet(); !slices.Equal(got, want) {
		t.Fatalf("working set %v, want each fault's window %v", got, want)
	}
}
