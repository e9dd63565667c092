package snapshotter

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// Manifest is a snapshot as it travels from one graph to another: its
// record and, for each of its maps, the delta against its parent's map in
// the graph's own encoding (a magic, varint block gaps, chunk ids and a
// CRC-32C), which AddManifest checks again.
type Manifest struct {
	Snapshot Snapshot `json:"snapshot"`
	// ParentCreated is when the parent was made: a graph whose snapshot
	// of the parent's name was made at another time holds another parent,
	// and the deltas would mean something else over it.
	ParentCreated time.Time         `json:"parent_created,omitzero"`
	Deltas        map[string][]byte `json:"deltas"`
}

// Manifest returns snapshot name as a Manifest.
func (g *Graph) Manifest(name string) (Manifest, error) {
	var m Manifest
	err := g.db.View(func(tx *bolt.Tx) error {
		s, err := getSnapshot(tx, name)
		if err != nil {
			return err
		}
		m.Snapshot = s
		if s.Parent != "" {
			p, err := getSnapshot(tx, s.Parent)
			if err != nil {
				return fmt.Errorf("parent of %q: %w", name, err)
			}
			m.ParentCreated = p.Created
		}
		m.Deltas = map[string][]byte{}
		for _, mi := range s.Maps {
			v := tx.Bucket(bucketDeltas).Get(deltaKey(name, mi.Name))
			if v == nil {
				return fmt.Errorf("snapshot %q map %q: delta missing: %w", name, mi.Name, errdefs.ErrDataLoss)
			}
			m.Deltas[mi.Name] = bytes.Clone(v)
		}
		return nil
	})
	return m, err
}

// Chunks returns the distinct chunk ids the manifest's deltas name, the
// zero chunk left out, checking each delta on the way.
func (m Manifest) Chunks() ([]cas.ID, error) {
	seen := map[cas.ID]struct{}{}
	var out []cas.ID
	for _, mi := range m.Snapshot.Maps {
		d, ok := m.Deltas[mi.Name]
		if !ok {
			return nil, fmt.Errorf("snapshot %q map %q: delta missing: %w", m.Snapshot.Name, mi.Name, errdefs.ErrDataLoss)
		}
		changes, err := decodeDelta(d)
		if err != nil {
			return nil, fmt.Errorf("snapshot %q map %q: %w", m.Snapshot.Name, mi.Name, err)
		}
		for _, c := range changes {
			if c.ID == cas.ZeroID {
				continue
			}
			if _, ok := seen[c.ID]; !ok {
				seen[c.ID] = struct{}{}
				out = append(out, c.ID)
			}
		}
	}
	return out, nil
}

// AddManifest adds the snapshot m describes to the graph. Its parent must
// be here, the same one (made at ParentCreated), and every chunk it names
// must be in the store: the write order holds across graphs too. A
// snapshot of the name already here is fine when it is the same one (made
// at the same time, with the same deltas), else errdefs.ErrAlreadyExists.
func (g *Graph) AddManifest(m Manifest) error {
	s := m.Snapshot
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	if len(m.Deltas) != len(s.Maps) {
		return fmt.Errorf("snapshot %q: %d maps but %d deltas: %w", s.Name, len(s.Maps), len(m.Deltas), errdefs.ErrInvalidArgument)
	}
	ids, err := m.Chunks()
	if err != nil {
		return err
	}
	store := g.store
	for _, id := range ids {
		if !store.Has(id) {
			return fmt.Errorf("snapshot %q names chunk %s, which the store does not hold: %w", s.Name, id, errdefs.ErrFailedPrecondition)
		}
	}
	rec, err := json.Marshal(s)
	if err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	err = g.db.Update(func(tx *bolt.Tx) error {
		if old, err := getSnapshot(tx, s.Name); err == nil {
			if old.Created.Equal(s.Created) && sameDeltas(tx, s.Name, m.Deltas) {
				return nil
			}
			return fmt.Errorf("snapshot %q already exists and is another: %w", s.Name, errdefs.ErrAlreadyExists)
		} else if !errors.Is(err, errdefs.ErrNotFound) {
			return err
		}
		if s.Parent != "" {
			p, err := getSnapshot(tx, s.Parent)
			if err != nil {
				return fmt.Errorf("parent of %q: %w", s.Name, err)
			}
			if !p.Created.Equal(m.ParentCreated) {
				return fmt.Errorf("snapshot %q stands on another %q than this graph's: %w", s.Name, s.Parent, errdefs.ErrFailedPrecondition)
			}
		}
		for name, d := range m.Deltas {
			if _, ok := s.Map(name); !ok {
				return fmt.Errorf("snapshot %q: delta of unknown map %q: %w", s.Name, name, errdefs.ErrInvalidArgument)
			}
			if err := tx.Bucket(bucketDeltas).Put(deltaKey(s.Name, name), d); err != nil {
				return err
			}
		}
		return tx.Bucket(bucketSnapshots).Put([]byte(s.Name), rec)
	})
	if err != nil {
		return fmt.Errorf("adding snapshot %q: %w", s.Name, dbErr(err))
	}
	return nil
}

// sameDeltas reports whether snapshot name's deltas are deltas.
func sameDeltas(tx *bolt.Tx, name string, deltas map[string][]byte) bool {
	have := map[string][]byte{}
	for mn := range deltas {
		have[mn] = tx.Bucket(bucketDeltas).Get(deltaKey(name, mn))
	}
	return maps.EqualFunc(have, deltas, bytes.Equal)
}
