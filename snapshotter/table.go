package snapshotter

import "github.com/boxd-dev/boxd/cas"

// table maps block numbers to chunk ids in pages of 1024 entries. A page that
// is all zero blocks is absent, so sparse images cost little. Clone shares
// pages; a clone copies a page the first time it writes to it.
type table struct {
	pages []*tablePage
	owned []bool // owned[p]: pages[p] belongs to this table alone
}

const (
	pageShift = 10
	pageLen   = 1 << pageShift
)

// tablePage holds ids; the empty ID{} stands for the zero chunk.
type tablePage [pageLen]cas.ID

func (t *table) get(n uint64) cas.ID {
	p := n >> pageShift
	if p >= uint64(len(t.pages)) || t.pages[p] == nil {
		return cas.ZeroID
	}
	id := t.pages[p][n&(pageLen-1)]
	if id == (cas.ID{}) {
		return cas.ZeroID
	}
	return id
}

func (t *table) set(n uint64, id cas.ID) {
	p := n >> pageShift
	if id == cas.ZeroID {
		if p >= uint64(len(t.pages)) || t.pages[p] == nil {
			return
		}
		id = cas.ID{}
	}
	for p >= uint64(len(t.pages)) {
		t.pages = append(t.pages, nil)
		t.owned = append(t.owned, false)
	}
	if t.pages[p] == nil {
		t.pages[p], t.owned[p] = new(tablePage), true
	} else if !t.owned[p] {
		cp := *t.pages[p]
		t.pages[p], t.owned[p] = &cp, true
	}
	t.pages[p][n&(pageLen-1)] = id
}

// freeze makes t read-only, so that it may be shared and cloned: it never
// writes its pages again.
func (t *table) freeze() { clear(t.owned) }

// clone returns a table that shares every page with the frozen table t and
// copies a page the first time it writes to it.
func (t *table) clone() *table {
	return &table{pages: append([]*tablePage(nil), t.pages...), owned: make([]bool, len(t.pages))}
}

// truncate drops every entry at or beyond block n.
func (t *table) truncate(n uint64) {
	p := (n + pageLen - 1) >> pageShift
	if p < uint64(len(t.pages)) {
		clear(t.pages[p:])
		t.pages, t.owned = t.pages[:p], t.owned[:p]
	}
	if n&(pageLen-1) != 0 && p > 0 && p <= uint64(len(t.pages)) && t.pages[p-1] != nil {
		for b := n; b < p<<pageShift; b++ {
			t.set(b, cas.ZeroID)
		}
	}
}

// each calls fn for every non-zero block, in block order.
func (t *table) each(fn func(n uint64, id cas.ID) error) error {
	for p, pg := range t.pages {
		if pg == nil {
			continue
		}
		for i := range pg {
			if pg[i] == (cas.ID{}) {
				continue
			}
			if err := fn(uint64(p)<<pageShift|uint64(i), pg[i]); err != nil {
				return err
			}
		}
	}
	return nil
}
