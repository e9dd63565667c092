package snapshotter

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
)

// write is one block a test snapshot writes: content picks the block's
// bytes (the same content, the same chunk; 0 is a zero block).
type write struct {
	m       string
	block   uint64
	content int
}

// content returns the bytes of content c: distinct for each c, zero for 0.
func content(c int) []byte {
	b := make([]byte, bs)
	if c != 0 {
		copy(b, fmt.Sprintf("content %d", c))
		copy(b[bs/2:], randomBytes(newRand(uint64(c)), bs/2))
	}
	return b
}

// commit makes snapshot name over parent with writes.
func commit(t testing.TB, g *Graph, name, parent string, writes ...write) Snapshot {
	t.Helper()
	d, err := g.NewDraft(parent)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Abort()
	for _, w := range writes {
		kind := KindDisk
		if w.m == "memory" {
			kind = KindMemory
		}
		if err := d.WriteBlock(w.m, kind, w.block, content(w.content)); err != nil {
			t.Fatal(err)
		}
	}
	s, err := d.Commit(name, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// groupByName puts snapshot box.NAME.N in group NAME, others in none.
func groupByName(s Snapshot) string {
	rest, ok := strings.CutPrefix(s.Name, "box.")
	if !ok {
		return ""
	}
	name, _, _ := strings.Cut(rest, ".")
	return name
}

// stored is the stored size of the chunks of contents cs.
func stored(t testing.TB, g *Graph, cs ...int) Exclusive {
	t.Helper()
	var e Exclusive
	for _, c := range cs {
		loc, err := g.Store().Lookup(cas.Sum(content(c)))
		if err != nil {
			t.Fatal(err)
		}
		e.Chunks++
		e.StoredBytes += int64(loc.Stored)
	}
	return e
}

func TestExclusiveByGroup(t *testing.T) {
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	// An image of contents 1-4; box a's first snapshot over it, a second
	// one over that; box b forked from a's second snapshot.
	commit(t, g, "image.x", "", write{"disk", 0, 1}, write{"disk", 1, 2}, write{"disk", 2, 3}, write{"disk", 3, 4})
	commit(t, g, "box.a.1", "image.x",
		write{"disk", 0, 10}, // a's own until b stands on it... b overwrites block 0
		write{"disk", 1, 11}, // overwritten by a.2: still a.1's alone
		write{"memory", 0, 12}, write{"memory", 1, 13})
	commit(t, g, "box.a.2", "box.a.1",
		write{"disk", 1, 20},
		write{"disk", 2, 2},    // back to the image's content: shared
		write{"memory", 1, 21}) // memory block 0 (12) inherited: b has it too
	commit(t, g, "box.b.1", "box.a.2",
		write{"disk", 0, 30},
		write{"disk", 5, 11},  // the same bytes as a's 11: shared by dedup
		write{"memory", 1, 0}) // 21 no longer b's: a's alone
	commit(t, g, "box.b.2", "box.b.1", write{"disk", 6, 31})

	got, err := g.ExclusiveByGroup(ctx, groupByName)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]Exclusive{
		"a": stored(t, g, 10, 13, 21),
		"b": stored(t, g, 30, 31),
	}
	if !maps.Equal(got, want) {
		t.Errorf("ExclusiveByGroup: %+v, want %+v", got, want)
	}
	if got["a"].StoredBytes == 0 {
		t.Error("no stored bytes")
	}

	// Every snapshot in one group but the image's: all but the image's
	// chunks (and the one it shares back) are the group's.
	one, err := g.ExclusiveByGroup(ctx, func(s Snapshot) string {
		if strings.HasPrefix(s.Name, "box.") {
			return "boxes"
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	if w := stored(t, g, 10, 11, 12, 13, 20, 21, 30, 31); !maps.Equal(one, map[string]Exclusive{"boxes": w}) {
		t.Errorf("one group: %+v, want %+v", one, w)
	}

	// No groups: nothing is anyone's.
	none, err := g.ExclusiveByGroup(ctx, func(Snapshot) string { return "" })
	if err != nil || len(none) != 0 {
		t.Errorf("no groups: %v, %v", none, err)
	}
}

// TestExclusiveByGroupModel checks ExclusiveByGroup against reading every
// block of every snapshot, on random trees of snapshots of a few groups
// drawing their blocks from a small set of contents.
func TestExclusiveByGroupModel(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(8) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			g := testutil.OpenGraph(t, t.TempDir(), Open)
			r := newRand(seed)
			var snaps []string
			for i := range 14 {
				parent := ""
				if i > 0 && r.IntN(5) > 0 {
					parent = snaps[r.IntN(len(snaps))]
				}
				name := fmt.Sprintf("image.%d", i)
				if grp := r.IntN(4); grp > 0 {
					name = fmt.Sprintf("box.g%d.%d", grp, i)
				}
				var writes []write
				for range 1 + r.IntN(12) {
					m := "disk"
					if r.IntN(3) == 0 {
						m = "memory"
					}
					writes = append(writes, write{m, uint64(r.IntN(16)), r.IntN(40)})
				}
				commit(t, g, name, parent, writes...)
				snaps = append(snaps, name)
			}
			got, err := g.ExclusiveByGroup(ctx, groupByName)
			if err != nil {
				t.Fatal(err)
			}
			if want := exclusiveModel(t, g, groupByName); !maps.Equal(got, want) {
				t.Errorf("ExclusiveByGroup: %+v\nreading every block: %+v", got, want)
			}
		})
	}
}

// exclusiveModel is ExclusiveByGroup the slow way: every block of every
// snapshot read.
func exclusiveModel(t *testing.T, g *Graph, group func(Snapshot) string) map[string]Exclusive {
	t.Helper()
	all, err := g.List()
	if err != nil {
		t.Fatal(err)
	}
	groups := map[cas.ID]map[string]bool{}
	out := map[string]Exclusive{}
	for _, s := range all {
		grp := group(s)
		if grp != "" {
			out[grp] = Exclusive{}
		}
		err := g.eachBlock(s, func(_ MapInfo, _ uint64, id cas.ID) {
			if groups[id] == nil {
				groups[id] = map[string]bool{}
			}
			groups[id][grp] = true
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for id, in := range groups {
		if len(in) != 1 || in[""] {
			continue
		}
		for grp := range in {
			loc, err := g.Store().Lookup(id)
			if err != nil {
				t.Fatal(err)
			}
			e := out[grp]
			e.Chunks++
			e.StoredBytes += int64(loc.Stored)
			out[grp] = e
		}
	}
	return out
}

// BenchmarkExclusiveByGroup weighs ExclusiveByGroup against Report on a
// store shaped like a daemon's: an image, and boxes each with a first
// snapshot over it (all their memory, some disk) and two more that change
// a little, one box forked from another.
func BenchmarkExclusiveByGroup(b *testing.B) {
	const (
		imageBlocks  = 32 << 10 // 128 MiB
		memoryBlocks = 8 << 10  // 32 MiB
		boxes        = 8
	)
	g := testutil.OpenGraph(b, b.TempDir(), Open)
	c := 0
	next := func() int { c++; return c }
	var image []write
	for n := range uint64(imageBlocks) {
		image = append(image, write{"disk", n, next()})
	}
	commit(b, g, "image.x", "", image...)
	for i := range boxes {
		parent := "image.x"
		if i == boxes-1 {
			parent = "box.b0.3" // a fork of the first box
		}
		for s := 1; s <= 3; s++ {
			var writes []write
			mem := memoryBlocks
			if s > 1 || parent != "image.x" {
				mem = memoryBlocks / 8
			}
			for n := range mem {
				writes = append(writes, write{"memory", uint64(n * memoryBlocks / mem), next()})
			}
			for n := range imageBlocks / 64 {
				writes = append(writes, write{"disk", uint64(n*64 + s), next()})
			}
			name := fmt.Sprintf("box.b%d.%d", i, s)
			commit(b, g, name, parent, writes...)
			parent = name
		}
	}
	all, err := g.List()
	if err != nil {
		b.Fatal(err)
	}
	var blocks int64
	for _, s := range all {
		blocks += s.Size() / bs
	}
	b.Logf("%d snapshots, %d blocks in all, %d chunks", len(all), blocks, c)
	ctx := context.Background()
	b.Run("ExclusiveByGroup", func(b *testing.B) {
		for b.Loop() {
			if _, err := g.ExclusiveByGroup(ctx, groupByName); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Report", func(b *testing.B) {
		for b.Loop() {
			if _, err := g.Report(ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
}
