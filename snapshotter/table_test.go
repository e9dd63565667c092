package snapshotter

import (
	"testing"

	"github.com/boxd-dev/boxd/cas"
)

func idOf(n uint64) cas.ID { return cas.Sum([]byte{byte(n), byte(n >> 8), byte(n >> 16), 1}) }

// contents lists a table's non-zero entries.
func contents(t *table) map[uint64]cas.ID {
	out := map[uint64]cas.ID{}
	last := int64(-1)
	_ = t.each(func(n uint64, id cas.ID) error {
		if int64(n) <= last {
			panic("each out of order")
		}
		last = int64(n)
		out[n] = id
		return nil
	})
	return out
}

func sameContents(a, b map[uint64]cas.ID) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestTableSetGet(t *testing.T) {
	var tb table
	if tb.get(0) != cas.ZeroID || tb.get(1<<40) != cas.ZeroID {
		t.Fatal("empty table: non-zero block")
	}
	tb.set(5000, cas.ZeroID)
	if len(tb.pages) != 0 {
		t.Fatalf("setting a zero block allocated %d pages", len(tb.pages))
	}
	for _, n := range []uint64{0, 1, pageLen - 1, pageLen, 3*pageLen + 7} {
		tb.set(n, idOf(n))
	}
	for _, n := range []uint64{0, 1, pageLen - 1, pageLen, 3*pageLen + 7} {
		if tb.get(n) != idOf(n) {
			t.Fatalf("get(%d) differs from what was set", n)
		}
	}
	if tb.pages[2] != nil {
		t.Fatal("a page with no blocks was allocated")
	}
	tb.set(1, cas.ZeroID)
	if tb.get(1) != cas.ZeroID {
		t.Fatal("block set to zero does not read zero")
	}
	got := contents(&tb)
	if len(got) != 4 {
		t.Fatalf("each visits %d blocks, want 4", len(got))
	}
}

func TestTableCloneCopyOnWrite(t *testing.T) {
	var orig table
	for n := range uint64(2*pageLen + 10) {
		if n%3 != 0 {
			orig.set(n, idOf(n))
		}
	}
	orig.freeze()
	want := contents(&orig)

	c := orig.clone()
	for p := range orig.pages {
		if c.pages[p] != orig.pages[p] {
			t.Fatalf("clone copied page %d before writing it", p)
		}
	}
	c.set(1, idOf(99999))
	c.set(pageLen+2, cas.ZeroID)
	c.set(5*pageLen, idOf(5))
	if c.pages[0] == orig.pages[0] || c.pages[1] == orig.pages[1] {
		t.Fatal("writing a clone did not copy the pages it wrote")
	}
	if c.pages[2] != orig.pages[2] {
		t.Fatal("a page the clone did not write was copied")
	}
	if !sameContents(contents(&orig), want) || len(orig.pages) != 3 {
		t.Fatal("writing a clone changed the original")
	}
	if c.get(1) != idOf(99999) || c.get(pageLen+2) != cas.ZeroID || c.get(5*pageLen) != idOf(5) || c.get(2) != idOf(2) {
		t.Fatal("clone does not read what was written to it")
	}

	// A clone of a frozen clone, written, changes neither.
	c.freeze()
	cWant := contents(c)
	cc := c.clone()
	cc.set(2, idOf(7))
	cc.truncate(10)
	if !sameContents(contents(c), cWant) || !sameContents(contents(&orig), want) {
		t.Fatal("writing a second-generation clone changed an ancestor")
	}
	if len(contents(cc)) != 6 { // 1 2 4 5 7 8
		t.Fatalf("truncated clone holds %d blocks, want 6", len(contents(cc)))
	}
	// Writing a page twice copies it once.
	d := orig.clone()
	d.set(4, idOf(1))
	p := d.pages[0]
	d.set(5, idOf(2))
	if d.pages[0] != p {
		t.Fatal("second write to an owned page copied it again")
	}
}

func TestTableTruncate(t *testing.T) {
	build := func(blocks ...uint64) *table {
		tb := &table{}
		for _, n := range blocks {
			tb.set(n, idOf(n))
		}
		tb.freeze()
		return tb
	}
	tests := []struct {
		name   string
		blocks []uint64
		at     uint64
		keep   int
	}{
		{"empty table, zero", nil, 0, 0},
		{"empty table, mid page", nil, 1, 0},
		{"empty table, pages beyond", nil, 5*pageLen + 3, 0},
		{"to zero", []uint64{0, pageLen + 1}, 0, 0},
		{"mid first page", []uint64{0, 5, 6, pageLen + 1}, 6, 2},
		{"on a page boundary", []uint64{0, pageLen - 1, pageLen, 2 * pageLen}, pageLen, 2},
		{"beyond the last page", []uint64{0, 1}, 3*pageLen + 1, 2},
		{"within a page beyond the last block", []uint64{0, 1}, 500, 2},
		{"into an absent page", []uint64{0, 3 * pageLen}, 2*pageLen + 5, 1},
		{"past everything", []uint64{0, 3 * pageLen}, 10 * pageLen, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			orig := build(tc.blocks...)
			want := contents(orig)
			c := orig.clone()
			c.truncate(tc.at)
			got := contents(c)
			if len(got) != tc.keep {
				t.Fatalf("truncate(%d) keeps %d blocks, want %d", tc.at, len(got), tc.keep)
			}
			for n := range got {
				if n >= tc.at {
					t.Fatalf("block %d survived truncate(%d)", n, tc.at)
				}
			}
			if !sameContents(contents(orig), want) {
				t.Fatal("truncating a clone changed the original")
			}
			// Growing again reads zeros where blocks were cut.
			c.set(tc.at+2*pageLen, idOf(1))
			for _, n := range tc.blocks {
				if n >= tc.at && c.get(n) != cas.ZeroID {
					t.Fatalf("block %d reads non-zero after truncate(%d) and growth", n, tc.at)
				}
			}
		})
	}
}

// TestTableModel checks random operations on a table and its clones against
// a plain map.
func TestTableModel(t *testing.T) {
	r := newRand(30)
	type gen struct {
		t     *table
		model map[uint64]cas.ID
	}
	cur := gen{&table{}, map[uint64]cas.ID{}}
	var frozen []gen
	const span = 4 * pageLen
	for step := range 20000 {
		switch op := r.IntN(100); {
		case op < 70:
			n := uint64(r.IntN(span))
			id := idOf(uint64(r.IntN(50)))
			if r.IntN(4) == 0 {
				id = cas.ZeroID
			}
			cur.t.set(n, id)
			if id == cas.ZeroID {
				delete(cur.model, n)
			} else {
				cur.model[n] = id
			}
		case op < 75:
			n := uint64(r.IntN(span + pageLen))
			cur.t.truncate(n)
			for k := range cur.model {
				if k >= n {
					delete(cur.model, k)
				}
			}
		case op < 80:
			cur.t.freeze()
			frozen = append(frozen, cur)
			m := map[uint64]cas.ID{}
			for k, v := range cur.model {
				m[k] = v
			}
			cur = gen{cur.t.clone(), m}
		default:
			n := uint64(r.IntN(span + pageLen))
			want, ok := cur.model[n]
			if !ok {
				want = cas.ZeroID
			}
			if cur.t.get(n) != want {
				t.Fatalf("step %d: get(%d) differs from the model", step, n)
			}
		}
	}
	for i, f := range append(frozen, cur) {
		if !sameContents(contents(f.t), f.model) {
			t.Fatalf("generation %d differs from its model: writes to a clone reached it", i)
		}
	}
}
