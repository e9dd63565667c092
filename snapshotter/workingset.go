package snapshotter

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/boxd-dev/boxd/cas"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// A working set is the list of pages a restore of a memory map faulted, in
// order. It is kept beside the snapshot (not in it: snapshots are
// immutable, and the list only tunes the next restore) and is replaced by
// each save. Encoding: uvarint count, then each page as a zigzag uvarint
// delta from the previous one.
var bucketWorkingSets = []byte("workingsets")

// SetWorkingSet keeps pages as the working set of map m of snapshot snap.
func (g *Graph) SetWorkingSet(snap, m string, pages []uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	buf := binary.AppendUvarint(nil, uint64(len(pages)))
	prev := int64(0)
	for _, p := range pages {
		buf = binary.AppendVarint(buf, int64(p)-prev)
		prev = int64(p)
	}
	return g.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketSnapshots).Get([]byte(snap)) == nil {
			return fmt.Errorf("snapshot %q: %w", snap, errdefs.ErrNotFound)
		}
		b, err := tx.CreateBucketIfNotExists(bucketWorkingSets)
		if err != nil {
			return err
		}
		return b.Put(deltaKey(snap, m), buf)
	})
}

// WorkingSet returns the working set of map m recorded for snap or, if it
// has none, for its nearest ancestor that has one (a fork starts where its
// parent left off), and the name of the snapshot it came from. It returns
// nil and "" when none is recorded.
func (g *Graph) WorkingSet(snap, m string) ([]uint64, string, error) {
	var pages []uint64
	var from string
	err := g.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketWorkingSets)
		for name := snap; name != ""; {
			s, err := getSnapshot(tx, name)
			if err != nil {
				return err
			}
			if b != nil {
				if v := b.Get(deltaKey(name, m)); v != nil {
					pages, err = decodeWorkingSet(v)
					if err != nil {
						return fmt.Errorf("working set of %q: %w", name, err)
					}
					from = name
					return nil
				}
			}
			name = s.Parent
		}
		return nil
	})
	return pages, from, err
}

func decodeWorkingSet(b []byte) ([]uint64, error) {
	count, n := binary.Uvarint(b)
	if n <= 0 || count > uint64(len(b)) {
		return nil, fmt.Errorf("bad count: %w", errdefs.ErrDataLoss)
	}
	b = b[n:]
	pages := make([]uint64, 0, count)
	prev := int64(0)
	for range count {
		d, n := binary.Varint(b)
		if n <= 0 {
			return nil, fmt.Errorf("truncated: %w", errdefs.ErrDataLoss)
		}
		prev += d
		if prev < 0 {
			return nil, fmt.Errorf("negative page: %w", errdefs.ErrDataLoss)
		}
		pages = append(pages, uint64(prev))
		b = b[n:]
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("%d trailing bytes: %w", len(b), errdefs.ErrDataLoss)
	}
	return pages, nil
}

// WorkingSetChunks returns the chunks the pages of every recorded working
// set hold (zero chunks left out). A working set whose snapshot or map is
// gone is skipped.
func (g *Graph) WorkingSetChunks() (map[cas.ID]struct{}, error) {
	type recorded struct {
		snap, m string
		pages   []uint64
	}
	var sets []recorded
	err := g.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketWorkingSets)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			snap, m, ok := strings.Cut(string(k), "\x00")
			if !ok {
				return nil
			}
			pages, err := decodeWorkingSet(v)
			if err != nil {
				return fmt.Errorf("working set of %q: %w", snap, err)
			}
			sets = append(sets, recorded{snap, m, pages})
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	hot := map[cas.ID]struct{}{}
	for _, ws := range sets {
		r, err := g.OpenMap(ws.snap, ws.m)
		if err != nil {
			continue
		}
		for _, p := range ws.pages {
			if p < r.Blocks() {
				if id := r.Block(p); id != cas.ZeroID {
					hot[id] = struct{}{}
				}
			}
		}
	}
	return hot, nil
}
