package memstore

import (
	"fmt"
	"sync"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Tables keeps the page tables of memory maps restored lately, so that the
// next restore of the same snapshot skips resolving every page of its map
// (a walk of the map and an index look-up per chunk), and so that the
// table of a new snapshot can be made from its parent's and the pages it
// changed (Derive). A table is resolved again once GC or compaction moved
// chunks since it was (cas.Store.Moves): its reads would miss and look each
// chunk up again, and it would not know which pages compaction put in
// frames. It is safe for concurrent use; set it in Options.Tables.
type Tables struct {
	maxPages int

	// mu protects the fields below.
	mu    sync.Mutex
	pages int // held, over all tables
	use   uint64
	byKey map[tableKey]*tableEntry
}

type tableKey struct {
	store   *cas.Store
	snap, m string
	// created tells apart two snapshots of the same name, one removed and
	// the other made since.
	created int64
}

// keyOf names map m of snapshot snap.
func keyOf(g *snapshotter.Graph, snap, m string) (tableKey, error) {
	s, err := g.Get(snap)
	if err != nil {
		return tableKey{}, err
	}
	return tableKey{g.Store(), snap, m, s.Created.UnixNano()}, nil
}

type tableEntry struct {
	tab  *pageTable // the whole map
	used uint64
}

// NewTables keeps tables of at most maxPages pages in all (about 56 bytes a
// page), dropping the least recently used first.
func NewTables(maxPages int) *Tables {
	return &Tables{maxPages: maxPages, byKey: map[tableKey]*tableEntry{}}
}

func (t *Tables) get(k tableKey) *pageTable {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.byKey[k]
	if e == nil {
		return nil
	}
	if e.tab.moves != k.store.Moves() {
		t.pages -= len(e.tab.ids)
		delete(t.byKey, k)
		return nil
	}
	t.use++
	e.used = t.use
	return e.tab
}

func (t *Tables) put(k tableKey, tab *pageTable) {
	if t == nil || len(tab.ids) > t.maxPages {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.byKey[k]; old != nil {
		t.pages -= len(old.tab.ids)
	}
	t.use++
	t.byKey[k] = &tableEntry{tab: tab, used: t.use}
	t.pages += len(tab.ids)
	for t.pages > t.maxPages {
		var oldest tableKey
		var oldestUse uint64
		for key, e := range t.byKey {
			if oldestUse == 0 || e.used < oldestUse {
				oldest, oldestUse = key, e.used
			}
		}
		t.pages -= len(t.byKey[oldest].tab.ids)
		delete(t.byKey, oldest)
	}
}

// Derive records the table of map m of snapshot child from that of its
// parent, if held: the same but for the listed pages (the pages child
// changed, ascending), whose chunks are read from child's map and looked
// up. Without the parent's table it does nothing.
func (t *Tables) Derive(g *snapshotter.Graph, parent, child, m string, changed []uint64) error {
	if m == "" {
		m = DefaultMap
	}
	store := g.Store()
	pk, err := keyOf(g, parent, m)
	if err != nil {
		return err
	}
	ck, err := keyOf(g, child, m)
	if err != nil {
		return err
	}
	pt := t.get(pk)
	if pt == nil {
		return nil
	}
	r, err := g.OpenMap(child, m)
	if err != nil {
		return err
	}
	if r.Blocks() != uint64(len(pt.ids)) {
		return nil
	}
	ids := make([]cas.ID, 0, len(changed))
	for _, p := range changed {
		if p >= r.Blocks() {
			return fmt.Errorf("changed page %d beyond the map's %d: %w", p, r.Blocks(), errdefs.ErrInvalidArgument)
		}
		ids = append(ids, r.Block(p))
	}
	locs, err := store.LookupMany(ids)
	if err != nil {
		return fmt.Errorf("memory map of %s: %w", child, err)
	}
	tab := &pageTable{ids: append([]cas.ID(nil), pt.ids...), locs: append([]cas.Location(nil), pt.locs...), moves: pt.moves}
	for i, p := range changed {
		tab.ids[p], tab.locs[p] = ids[i], locs[i]
	}
	t.put(ck, tab)
	return nil
}

// tableOf returns the page table of the whole of map m of snap (read
// through r), from t if it holds it, else resolved and kept in t.
func (t *Tables) tableOf(g *snapshotter.Graph, snap, m string, r *snapshotter.MapReader) (*pageTable, error) {
	k, kerr := keyOf(g, snap, m)
	if kerr == nil {
		if tab := t.get(k); tab != nil && uint64(len(tab.ids)) == r.Blocks() {
			return tab, nil
		}
	}
	tab, err := newPageTable(g.Store(), r, 0, int(r.Blocks()))
	if err != nil {
		return nil, err
	}
	if kerr == nil {
		t.put(k, tab)
	}
	return tab, nil
}

// slice returns the part of tab for pages [first, first+pages).
func (tab *pageTable) slice(first uint64, pages int) *pageTable {
	return &pageTable{ids: tab.ids[first : first+uint64(pages)], locs: tab.locs[first : first+uint64(pages)]}
}
