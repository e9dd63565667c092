package snapshotter

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

func TestIngestExportRoundTrip(t *testing.T) {
	r := newRand(1)
	mixed := randomBytes(r, 3*pageLen*bs/2+777) // spans two table pages
	for lo := 0; lo < len(mixed); lo += 37 * bs {
		clear(mixed[lo:min(lo+20*bs, len(mixed))])
	}
	headOnly := make([]byte, 5<<20+100) // one block of data, then 5 MiB of zeros
	copy(headOnly, randomBytes(r, bs))
	tailOnly := make([]byte, 5<<20+3)
	copy(tailOnly[len(tailOnly)-10:], "tail bytes")
	tests := []struct {
		name   string
		data   []byte
		sparse bool // the export must take far less disk than its size
	}{
		{"empty", nil, false},
		{"one byte", []byte{0x5a}, false},
		{"one block", randomBytes(r, bs), false},
		{"block minus one", randomBytes(r, bs-1), false},
		{"block plus one", randomBytes(r, bs+1), false},
		{"random odd size", randomBytes(r, 300*bs+123), false},
		{"zero block", make([]byte, bs), true},
		{"zeros odd size", make([]byte, 2<<20+4095), true},
		{"zeros over pages", make([]byte, 5<<20+1), true},
		{"zeros exact page", make([]byte, pageLen*bs), true},
		{"mixed", mixed, false},
		{"head only", headOnly, true},
		{"tail only", tailOnly, true},
		{"compressible", bytes.Repeat([]byte("boxd keeps snapshots. "), 20000), false},
	}
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := "snap-" + string(rune('a'+i))
			s := ingest(t, g, name, "", tc.data)
			m, ok := s.Map("disk")
			if !ok || m.Kind != KindDisk || m.Size != int64(len(tc.data)) {
				t.Fatalf("map = %+v (present %v), want disk of %d bytes", m, ok, len(tc.data))
			}
			if m.Changed != changedBlocks(nil, tc.data) {
				t.Errorf("Changed = %d, want %d non-zero blocks", m.Changed, changedBlocks(nil, tc.data))
			}
			out := export(t, g, name, "disk")
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.data) {
				t.Fatalf("export: %d bytes, first difference at %d of %d", len(got), firstDiff(got, tc.data), len(tc.data))
			}
			if tc.sparse {
				var st syscall.Stat_t
				if err := syscall.Stat(out, &st); err != nil {
					t.Fatal(err)
				}
				if used := st.Blocks * 512; used > int64(len(tc.data))/8+64<<10 {
					t.Errorf("export of %d bytes takes %d bytes of disk; zero blocks should be holes", len(tc.data), used)
				}
			}

			mr, err := g.OpenMap(name, "disk")
			if err != nil {
				t.Fatal(err)
			}
			if mr.Size() != int64(len(tc.data)) || mr.Blocks() != uint64((len(tc.data)+bs-1)/bs) {
				t.Fatalf("reader size %d, blocks %d for %d bytes", mr.Size(), mr.Blocks(), len(tc.data))
			}
			checkReadAt(t, mr, tc.data, newRand(uint64(i)))
		})
	}
	verifyOK(t, g)
}

// checkReadAt reads the map at assorted offsets and lengths and compares
// with data.
func checkReadAt(t *testing.T, mr *MapReader, data []byte, r interface{ IntN(int) int }) {
	t.Helper()
	size := len(data)
	type span struct{ off, n int }
	spans := []span{{0, 0}, {0, 1}, {0, size}, {0, size + 10}, {size, 1}, {size + 5, 3}}
	for _, off := range []int{bs - 1, bs, bs + 1, size - 1, size - bs - 1} {
		if off >= 0 {
			spans = append(spans, span{off, 2}, span{off, bs + 2})
		}
	}
	for range 40 {
		if size == 0 {
			break
		}
		spans = append(spans, span{r.IntN(size), r.IntN(3*bs) + 1})
	}
	for _, sp := range spans {
		buf := make([]byte, sp.n)
		n, err := mr.ReadAt(buf, int64(sp.off))
		want := 0
		if sp.off < size {
			want = min(sp.n, size-sp.off)
		}
		if n != want {
			t.Fatalf("ReadAt(%d bytes at %d) = %d bytes, %v; want %d", sp.n, sp.off, n, err, want)
		}
		if want < sp.n && !errors.Is(err, io.EOF) {
			t.Fatalf("ReadAt(%d bytes at %d) short read with error %v, want io.EOF", sp.n, sp.off, err)
		}
		if want == sp.n && err != nil {
			t.Fatalf("ReadAt(%d bytes at %d): %v", sp.n, sp.off, err)
		}
		if n > 0 && !bytes.Equal(buf[:n], data[sp.off:sp.off+n]) {
			t.Fatalf("ReadAt(%d bytes at %d) differs from the source", sp.n, sp.off)
		}
	}
	if _, err := mr.ReadAt(make([]byte, 1), -1); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("ReadAt at -1: %v, want ErrInvalidArgument", err)
	}
	got, err := io.ReadAll(io.NewSectionReader(mr, 0, mr.Size()))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("reading the whole map through a SectionReader: %v (equal %v)", err, bytes.Equal(got, data))
	}
}

func TestParentChain(t *testing.T) {
	const depth = 128
	const blocks = 96
	r := newRand(2)
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	levels := make([][]byte, depth)
	levels[0] = randomBytes(r, blocks*bs-100)
	clear(levels[0][10*bs : 20*bs])
	ingest(t, g, "level-000", "", levels[0])
	name := func(i int) string {
		return "level-" + string([]byte{'0' + byte(i/100), '0' + byte(i/10%10), '0' + byte(i%10)})
	}
	for i := 1; i < depth; i++ {
		d := slices.Clone(levels[i-1])
		for range 1 + r.IntN(4) {
			fillBlock(r, d, r.IntN(blocks))
		}
		if i%9 == 0 { // a block becomes zero
			z := r.IntN(blocks - 1)
			clear(d[z*bs : (z+1)*bs])
		}
		levels[i] = d
		s := ingest(t, g, name(i), name(i-1), d)
		if s.Parent != name(i-1) {
			t.Fatalf("%s: parent %q", name(i), s.Parent)
		}
		m, _ := s.Map("disk")
		if want := changedBlocks(levels[i-1], d); m.Changed != want {
			t.Fatalf("%s: Changed = %d, want %d", name(i), m.Changed, want)
		}
	}
	check := func(g *Graph, order []int) {
		t.Helper()
		for _, i := range order {
			checkExport(t, g, name(i), "disk", levels[i])
			mr, err := g.OpenMap(name(i), "disk")
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, bs)
			for _, n := range []int{0, 15, blocks - 1, r.IntN(blocks)} {
				if _, err := mr.ReadAt(buf[:min(bs, len(levels[i])-n*bs)], int64(n*bs)); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf[:min(bs, len(levels[i])-n*bs)], levels[i][n*bs:min((n+1)*bs, len(levels[i]))]) {
					t.Fatalf("%s block %d differs", name(i), n)
				}
			}
		}
	}
	all := make([]int, depth)
	for i := range all {
		all[i] = i
	}
	check(g, all)
	// A fresh graph has no resolved tables: the deepest snapshot is built
	// from the whole chain of deltas, then levels in random order.
	root := g.Root()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	g2 := testutil.OpenGraph(t, root, Open)
	r.Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	check(g2, append([]int{depth - 1}, all...))
	list, err := g2.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != depth {
		t.Fatalf("List: %d snapshots, want %d", len(list), depth)
	}
	for i, s := range list {
		if s.Name != name(i) {
			t.Fatalf("List[%d] = %s, want parents before children (%s)", i, s.Name, name(i))
		}
	}
	verifyOK(t, g2)
}

func TestChildSizes(t *testing.T) {
	r := newRand(3)
	page := pageLen * bs
	base := randomBytes(r, 10*bs)
	big := randomBytes(r, 2*page+5*bs+17)
	grown := append(slices.Clone(base), randomBytes(r, 2*page)...)
	zeroed := slices.Clone(base)
	clear(zeroed[3*bs : 5*bs])
	lastZeroed := slices.Clone(base)
	clear(lastZeroed[9*bs:])
	tests := []struct {
		name          string
		parent, child []byte
	}{
		{"same", base, slices.Clone(base)},
		{"shorter mid block", base, base[:4*bs+100]},
		{"shorter on a block", base, base[:3*bs]},
		{"empty child", base, nil},
		{"longer by a byte", base, append(slices.Clone(base), 1)},
		{"longer over pages", base, grown},
		{"longer with zero tail", base, append(slices.Clone(base), make([]byte, 2*page+3)...)},
		{"big parent small child", big, big[:bs+1]},
		{"big parent, shrink across pages", big, big[:page+bs/2]},
		{"blocks become zero", base, zeroed},
		{"last block becomes zero", base, lastZeroed},
		{"all zero child", big, make([]byte, len(big))},
		{"empty parent", nil, base},
		{"zero parent", make([]byte, page+bs), base},
	}
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, c := "p"+string(rune('a'+i)), "c"+string(rune('a'+i))
			ingest(t, g, p, "", tc.parent)
			s := ingest(t, g, c, p, tc.child)
			m, _ := s.Map("disk")
			if m.Size != int64(len(tc.child)) {
				t.Errorf("child size %d, want %d", m.Size, len(tc.child))
			}
			if want := changedBlocks(tc.parent, tc.child); m.Changed != want {
				t.Errorf("Changed = %d, want %d", m.Changed, want)
			}
			checkExport(t, g, c, "disk", tc.child)
			checkExport(t, g, p, "disk", tc.parent)
			// A grandchild that grows back to the parent's length must
			// read zeros where the child was cut short.
			back := make([]byte, max(len(tc.parent), len(tc.child)))
			copy(back, tc.child)
			ingest(t, g, "g"+string(rune('a'+i)), c, back)
			checkExport(t, g, "g"+string(rune('a'+i)), "disk", back)
		})
	}
	verifyOK(t, g)
}

func TestNames(t *testing.T) {
	valid := []string{"a", "A-b_c.1", strings.Repeat("x", 128), "...", ".a", "-"}
	invalid := []string{"", strings.Repeat("x", 129), "a/b", "..", ".", "has space", " a", "a ", "a\n", "tab\t", "ü", "a:b", "a\x00b"}
	for _, n := range valid {
		if err := ValidateName(n); err != nil {
			t.Errorf("ValidateName(%q) = %v, want nil", n, err)
		}
	}
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	for _, n := range invalid {
		if err := ValidateName(n); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ValidateName(%q) = %v, want ErrInvalidArgument", n, err)
		}
		_, err := g.Ingest(context.Background(), bytes.NewReader([]byte("x")), IngestOptions{Name: n})
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Ingest named %q = %v, want ErrInvalidArgument", n, err)
		}
		draft, err := g.NewDraft("")
		if err != nil {
			t.Fatal(err)
		}
		if err := draft.WriteBlock(n, KindDisk, 0, []byte("x")); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("WriteBlock to map %q = %v, want ErrInvalidArgument", n, err)
		}
		if _, err := draft.Commit(n, nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("Commit named %q = %v, want ErrInvalidArgument", n, err)
		}
	}
	for _, k := range []string{"", "Disk", "mem", "disk "} {
		if _, err := ParseKind(k); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("ParseKind(%q) = %v, want ErrInvalidArgument", k, err)
		}
	}
	if l, _ := g.List(); len(l) != 0 {
		t.Fatalf("invalid names left snapshots behind: %v", l)
	}
	verifyOK(t, g)
}

func TestBadInput(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(4)
	data := randomBytes(r, 20*bs)
	ingest(t, g, "base", "", data)
	ctx := context.Background()

	_, err := g.Ingest(ctx, bytes.NewReader(data), IngestOptions{Name: "base"})
	if !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Ingest of an existing name: %v, want ErrAlreadyExists", err)
	}
	_, err = g.Ingest(ctx, bytes.NewReader(data), IngestOptions{Name: "orphan", Parent: "nope"})
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("Ingest over an unknown parent: %v, want ErrNotFound naming it", err)
	}
	if _, err := g.NewDraft("nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("NewDraft over an unknown parent: %v, want ErrNotFound", err)
	}
	if _, err := g.OpenMap("nope", "disk"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("OpenMap of an unknown snapshot: %v", err)
	}
	if _, err := g.OpenMap("base", "memory"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("OpenMap of an unknown map: %v", err)
	}
	if err := g.Remove("nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Remove of an unknown snapshot: %v", err)
	}
	if _, err := g.Report(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Report of an unknown snapshot: %v", err)
	}
	failing := io.MultiReader(bytes.NewReader(data[:5*bs]), iotestErr{})
	if _, err := g.Ingest(ctx, failing, IngestOptions{Name: "torn"}); err == nil {
		t.Error("Ingest from a failing reader succeeded")
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := g.Ingest(cancelled, bytes.NewReader(data), IngestOptions{Name: "cancelled"}); !errors.Is(err, context.Canceled) {
		t.Errorf("Ingest with a cancelled context: %v", err)
	}

	draft, err := g.NewDraft("base")
	if err != nil {
		t.Fatal(err)
	}
	if err := draft.WriteBlock("disk", KindDisk, 0, make([]byte, bs+1)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("WriteBlock of more than a chunk: %v", err)
	}
	if err := draft.WriteBlock("disk", KindDisk, ^uint64(0), []byte("x")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("WriteBlock at the largest block number: %v", err)
	}
	if err := draft.WriteBlock("disk", KindMemory, 0, []byte("x")); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("WriteBlock of the wrong kind: %v", err)
	}
	if err := draft.SetSize("disk", KindDisk, -1); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("SetSize(-1): %v", err)
	}
	if _, err := draft.Commit("base", nil); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("Commit to an existing name: %v", err)
	}
	if _, err := draft.Commit("again", nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("second Commit of one draft: %v", err)
	}
	draft.Abort() // harmless after Commit

	list, err := g.List()
	if err != nil || len(list) != 1 || list[0].Name != "base" {
		t.Fatalf("after the failures List = %v, %v; want only base", list, err)
	}
	checkExport(t, g, "base", "disk", data)
	verifyOK(t, g)
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("disk went away") }

func TestRemoveAndGC(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(5)
	ctx := context.Background()
	base := randomBytes(r, 64*bs)
	child := slices.Clone(base)
	for n := range 10 {
		fillBlock(r, child, n*3)
	}
	grandchild := slices.Clone(child)
	fillBlock(r, grandchild, 63)
	other := randomBytes(r, 30*bs)
	copy(other, base[:5*bs]) // shares five chunks with base
	ingest(t, g, "base", "", base)
	ingest(t, g, "child", "base", child)
	ingest(t, g, "grandchild", "child", grandchild)
	ingest(t, g, "other", "", other)

	for _, name := range []string{"base", "child"} {
		err := g.Remove(name)
		if !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Fatalf("Remove(%s) with children: %v, want ErrFailedPrecondition", name, err)
		}
		kids, _ := g.Children(name)
		for _, k := range kids {
			if !strings.Contains(err.Error(), k) {
				t.Errorf("Remove(%s): %q does not name the child %s", name, err, k)
			}
		}
	}

	rep, err := g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var predicted SnapshotReport
	for _, s := range rep.PerSnap {
		if s.Name == "grandchild" {
			predicted = s
		}
	}
	// Only the tip of the grandchild's one changed block is its own; the
	// blocks child changed are shared with child.
	if predicted.ExclusiveChunks != 1 || predicted.ExclusiveBytes <= 0 {
		t.Fatalf("grandchild exclusive: %d chunks, %d bytes; want 1 chunk", predicted.ExclusiveChunks, predicted.ExclusiveBytes)
	}

	if err := g.Remove("grandchild"); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Get("grandchild"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Get after Remove: %v", err)
	}
	if _, err := g.OpenMap("grandchild", "disk"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("OpenMap after Remove: %v", err)
	}
	if err := g.Remove("grandchild"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("second Remove: %v", err)
	}
	before, err := g.Store().Stats()
	if err != nil {
		t.Fatal(err)
	}
	st, err := g.GC(ctx, cas.GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	after, err := g.Store().Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.ChunksDeleted != predicted.ExclusiveChunks || before.Chunks-after.Chunks != predicted.ExclusiveChunks {
		t.Errorf("gc deleted %d chunks (index %d → %d); report predicted %d", st.ChunksDeleted, before.Chunks, after.Chunks, predicted.ExclusiveChunks)
	}
	if before.StoredBytes-after.StoredBytes != predicted.ExclusiveBytes {
		t.Errorf("gc freed %d stored bytes; report predicted %d", before.StoredBytes-after.StoredBytes, predicted.ExclusiveBytes)
	}
	if st.BytesFreed <= 0 {
		t.Errorf("gc freed %d pack bytes", st.BytesFreed)
	}

	// Now child is a leaf: removing it frees what it alone held.
	rep, err = g.Report(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.PerSnap) != 1 || rep.PerSnap[0].ExclusiveChunks != 10 {
		t.Fatalf("report of child: %+v, want 10 exclusive chunks", rep.PerSnap)
	}
	predicted = rep.PerSnap[0]
	if err := g.Remove("child"); err != nil {
		t.Fatal(err)
	}
	before, _ = g.Store().Stats()
	if _, err := g.GC(ctx, cas.GCOptions{Threshold: 1e-9}); err != nil {
		t.Fatal(err)
	}
	after, _ = g.Store().Stats()
	if before.Chunks-after.Chunks != predicted.ExclusiveChunks || before.StoredBytes-after.StoredBytes != predicted.ExclusiveBytes {
		t.Errorf("gc removed %d chunks, %d bytes; report predicted %d, %d", before.Chunks-after.Chunks, before.StoredBytes-after.StoredBytes, predicted.ExclusiveChunks, predicted.ExclusiveBytes)
	}

	checkExport(t, g, "base", "disk", base)
	checkExport(t, g, "other", "disk", other)
	verifyOK(t, g)
	// A second collection finds nothing more.
	st, err = g.GC(ctx, cas.GCOptions{Threshold: 1e-9})
	if err != nil || st.ChunksDeleted != 0 {
		t.Fatalf("second gc: %+v, %v", st, err)
	}
	// A removed name can be used again, with other content.
	fresh := randomBytes(r, 7*bs)
	ingest(t, g, "child", "base", fresh)
	checkExport(t, g, "child", "disk", fresh)
	verifyOK(t, g)
}

func TestRestart(t *testing.T) {
	root := t.TempDir()
	r := newRand(6)
	g, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	disk := randomBytes(r, 40*bs+11)
	mem := randomBytes(r, 8*bs)
	ingest(t, g, "a", "", disk)
	s, err := g.Ingest(context.Background(), bytes.NewReader(mem), IngestOptions{Name: "b", Parent: "a", Kind: KindMemory, Labels: map[string]string{"box": "web-1"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Maps) != 2 {
		t.Fatalf("b has maps %+v, want disk (inherited) and memory", s.Maps)
	}
	want, err := g.List()
	if err != nil {
		t.Fatal(err)
	}
	// The root is held while open.
	if _, err := Open(root); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("second Open of a root in use: %v, want ErrUnavailable", err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}

	g = testutil.OpenGraph(t, root, Open)
	got, err := g.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("after reopening: %d snapshots, want %d", len(got), len(want))
	}
	for i := range got {
		a, b := got[i], want[i]
		if a.Name != b.Name || a.Parent != b.Parent || !a.Created.Equal(b.Created) || !slices.Equal(a.Maps, b.Maps) || len(a.Labels) != len(b.Labels) || a.Labels["box"] != b.Labels["box"] {
			t.Fatalf("after reopening: %+v, want %+v", a, b)
		}
	}
	checkExport(t, g, "a", "disk", disk)
	checkExport(t, g, "b", "disk", disk)
	checkExport(t, g, "b", "memory", mem)
	verifyOK(t, g)
	if kids, _ := g.Children("a"); !slices.Equal(kids, []string{"b"}) {
		t.Fatalf("Children(a) = %v", kids)
	}
}

// TestConcurrentReaders reads one snapshot from many goroutines while
// another snapshot is being written.
func TestConcurrentReaders(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(7)
	data := randomBytes(r, 200*bs+5)
	ingest(t, g, "a", "", data)
	mr, err := g.OpenMap("a", "disk")
	if err != nil {
		t.Fatal(err)
	}
	more := randomBytes(r, 300*bs)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	wg.Go(func() {
		if _, err := g.Ingest(context.Background(), bytes.NewReader(more), IngestOptions{Name: "b", Parent: "a"}); err != nil {
			errs <- err
		}
	})
	for w := range 4 {
		wg.Go(func() {
			rr := newRand(uint64(100 + w))
			buf := make([]byte, 3*bs)
			for range 200 {
				off := rr.IntN(len(data))
				n, err := mr.ReadAt(buf, int64(off))
				if err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
				if !bytes.Equal(buf[:n], data[off:off+n]) {
					errs <- errors.New("concurrent read differs")
					return
				}
			}
			if _, err := g.OpenMap("a", "disk"); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	checkExport(t, g, "b", "disk", more)
	verifyOK(t, g)
}

// TestNameReused removes a snapshot and makes another of the same name: no
// table resolved for the first may serve the second.
func TestNameReused(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(8)
	first, second := randomBytes(r, 9*bs), randomBytes(r, 7*bs+1)
	ingest(t, g, "x", "", first)
	old, err := g.Get("x")
	if err != nil {
		t.Fatal(err)
	}
	// A reader resolves x as it is removed: its table lands in the cache
	// after Remove has cleared x's entries.
	stale, err := g.resolve(old, "disk")
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Remove("x"); err != nil {
		t.Fatal(err)
	}
	g.cache.put(old, "disk", stale)
	ingest(t, g, "x", "", second)
	checkExport(t, g, "x", "disk", second)

	// A draft over a parent that is removed and made again before the
	// draft commits must not become the new parent's child: its delta is
	// against the old one.
	ingest(t, g, "p", "", first)
	draft, err := g.NewDraft("p")
	if err != nil {
		t.Fatal(err)
	}
	defer draft.Abort()
	if err := draft.WriteBlock("disk", KindDisk, 0, []byte("child")); err != nil {
		t.Fatal(err)
	}
	if err := g.Remove("p"); err != nil {
		t.Fatal(err)
	}
	// The new p (draft holds the store's write lock, so its record and
	// delta are written as Commit would write them).
	renewed := old
	renewed.Name, renewed.Created = "p", old.Created.Add(time.Hour)
	rec, _ := json.Marshal(renewed)
	err = g.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketDeltas).Put(deltaKey("p", "disk"), encodeDelta(nil)); err != nil {
			return err
		}
		return tx.Bucket(bucketSnapshots).Put([]byte("p"), rec)
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := draft.Commit("c", nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Commit over a parent made again: %v, want ErrNotFound", err)
	}
}
