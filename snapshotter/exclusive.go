package snapshotter

import (
	"context"

	"github.com/boxd-dev/boxd/cas"
)

// Exclusive is what one group of snapshots alone references in the store:
// the chunks that removing all of the group's snapshots, then gc, frees.
type Exclusive struct {
	Chunks int64 `json:"chunks"`
	// StoredBytes is what those chunks take in packs, compressed.
	StoredBytes int64 `json:"stored_bytes"`
}

// ExclusiveByGroup sorts the snapshots into groups (group names a
// snapshot's; "" is no group) and returns, for each group, the chunks that
// its snapshots reference and no snapshot outside it does. A chunk that a
// snapshot of no group references belongs to no group.
//
// Where a snapshot is in its parent's group, only its deltas are read: the
// chunks it shares with its parent are the group's already. Only a
// snapshot whose parent is in another group (a box's first snapshot over
// its image, a fork's child over the fork) has every block read. That makes
// the figures cheaper than Report's, which reads every block of every
// snapshot.
func (g *Graph) ExclusiveByGroup(ctx context.Context, group func(Snapshot) string) (map[string]Exclusive, error) {
	all, err := g.List()
	if err != nil {
		return nil, err
	}
	// owner is each referenced chunk's group, as an index into names;
	// shared is a chunk of several groups, or of none.
	const shared = -1
	var names []string
	index := map[string]int32{"": shared}
	owner := map[cas.ID]int32{}
	mark := func(id cas.ID, grp int32) {
		if o, seen := owner[id]; !seen {
			owner[id] = grp
		} else if o != grp {
			owner[id] = shared
		}
	}
	groupOf := map[string]string{}
	for _, s := range all { // parents before children
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		name := group(s)
		groupOf[s.Name] = name
		grp, ok := index[name]
		if !ok {
			grp = int32(len(names))
			names = append(names, name)
			index[name] = grp
		}
		parentGroup, hasParent := groupOf[s.Parent]
		for _, m := range s.Maps {
			if hasParent && parentGroup == name {
				// The map's delta against the parent's map of that name
				// (all of it where the parent has no such map) holds
				// every chunk the parent does not.
				changes, err := g.delta(s.Name, m.Name)
				if err != nil {
					return nil, err
				}
				for _, c := range changes {
					if c.ID != cas.ZeroID {
						mark(c.ID, grp)
					}
				}
				continue
			}
			t, err := g.resolve(s, m.Name)
			if err != nil {
				return nil, err
			}
			_ = t.each(func(_ uint64, id cas.ID) error {
				mark(id, grp)
				return nil
			})
		}
	}
	out := map[string]Exclusive{}
	for _, n := range names {
		out[n] = Exclusive{}
	}
	err = g.store.ForEach(func(id cas.ID, loc cas.Location) error {
		if o, ok := owner[id]; ok && o != shared {
			e := out[names[o]]
			e.Chunks++
			e.StoredBytes += int64(loc.Share())
			out[names[o]] = e
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
