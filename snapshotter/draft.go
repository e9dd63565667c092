package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// Draft is a writable snapshot in the making: it starts as a copy of its
// parent's maps (or empty), takes block writes, and becomes a snapshot on
// Commit. A Draft holds the store's write lock until Commit or Abort, so
// only one exists at a time.
type Draft struct {
	g      *Graph
	w      *cas.Writer
	parent *Snapshot
	maps   map[string]*draftMap
	order  []string
}

type draftMap struct {
	info MapInfo
	base *table // the parent's resolved map (frozen), truncated by SetSize, or nil
	// parent is the parent's resolved map as it is, which the delta is
	// against; base differs from it only where a shrink cut blocks off.
	parent  *table
	changes map[uint64]cas.ID
}

// NewDraft starts a draft over parent ("" for none). It waits for the
// store's write lock.
func (g *Graph) NewDraft(parent string) (*Draft, error) {
	d := &Draft{g: g, maps: map[string]*draftMap{}}
	if parent != "" {
		p, err := g.Get(parent)
		if err != nil {
			return nil, fmt.Errorf("parent: %w", err)
		}
		d.parent = &p
		for _, m := range p.Maps {
			base, err := g.resolve(p, m.Name)
			if err != nil {
				return nil, err
			}
			d.maps[m.Name] = &draftMap{info: MapInfo{Name: m.Name, Kind: m.Kind, Size: m.Size}, base: base, parent: base, changes: map[uint64]cas.ID{}}
			d.order = append(d.order, m.Name)
		}
	}
	d.w = g.store.NewWriter()
	return d, nil
}

// mapFor returns the draft's map called name, creating it empty.
func (d *Draft) mapFor(name string, kind Kind) (*draftMap, error) {
	if d.w == nil {
		return nil, fmt.Errorf("image already committed or aborted: %w", errdefs.ErrFailedPrecondition)
	}
	if err := ValidateName(name); err != nil {
		return nil, fmt.Errorf("map: %w", err)
	}
	m := d.maps[name]
	if m == nil {
		m = &draftMap{info: MapInfo{Name: name, Kind: kind}, changes: map[uint64]cas.ID{}}
		d.maps[name] = m
		d.order = append(d.order, name)
	}
	if m.info.Kind != kind {
		return nil, fmt.Errorf("map %q is %s, not %s: %w", name, m.info.Kind, kind, errdefs.ErrInvalidArgument)
	}
	// Every write goes through here first: store its chunks as its kind
	// wants them.
	d.w.StoreRaw(kind.storedRaw())
	return m, nil
}

// count adds what the store's writer did between two of its Stats to the
// map's write statistics.
func (m *draftMap) count(before, after cas.WriteStats) {
	m.info.ZeroChunks += after.ZeroChunks - before.ZeroChunks
	m.info.NewChunks += after.NewChunks - before.NewChunks
	m.info.ReusedChunks += after.ReusedChunk - before.ReusedChunk
	m.info.NewStored += after.NewStored - before.NewStored
}

func (m *draftMap) baseID(n uint64) cas.ID {
	if m.base == nil {
		return cas.ZeroID
	}
	return m.base.get(n)
}

func (m *draftMap) record(n uint64, id cas.ID) {
	if id == m.baseID(n) {
		delete(m.changes, n)
		return
	}
	m.changes[n] = id
}

// WriteMap replaces the whole content of map name with what r holds; the
// map's size becomes the number of bytes read. progress, when not nil, is
// called with the bytes read so far.
func (d *Draft) WriteMap(ctx context.Context, name string, kind Kind, r io.Reader, progress func(int64)) (MapInfo, error) {
	m, err := d.mapFor(name, kind)
	if err != nil {
		return MapInfo{}, err
	}
	before := d.w.Stats()
	clear(m.changes)
	n, err := d.w.WriteStream(ctx, r, func(i int64, id cas.ID) error {
		m.record(uint64(i), id)
		if progress != nil && i%256 == 255 {
			progress((i + 1) * cas.ChunkSize)
		}
		return nil
	})
	if err != nil {
		return MapInfo{}, err
	}
	if progress != nil {
		progress(n)
	}
	d.setSize(m, n)
	m.count(before, d.w.Stats())
	return m.info, nil
}

// WriteBlock sets block n of map name to data (zero-padded to a chunk).
// The map grows to cover the block if it is shorter.
func (d *Draft) WriteBlock(name string, kind Kind, n uint64, data []byte) error {
	if len(data) > cas.ChunkSize {
		return fmt.Errorf("block of %d bytes is larger than a chunk: %w", len(data), errdefs.ErrInvalidArgument)
	}
	if n >= math.MaxInt64/cas.ChunkSize {
		return fmt.Errorf("block %d is beyond the largest image: %w", n, errdefs.ErrInvalidArgument)
	}
	m, err := d.mapFor(name, kind)
	if err != nil {
		return err
	}
	if end := int64(n+1) * cas.ChunkSize; end > m.info.Size && n != uint64(m.info.Size/cas.ChunkSize) {
		if err := d.cutTail(m, m.info.Size); err != nil {
			return err
		}
	}
	id, err := d.put(m, data)
	if err != nil {
		return err
	}
	m.record(n, id)
	if end := int64(n+1) * cas.ChunkSize; end > m.info.Size {
		m.info.Size = end
	}
	return nil
}

// SetSize sets the logical size of map name, truncating or extending it.
func (d *Draft) SetSize(name string, kind Kind, size int64) error {
	if size < 0 {
		return fmt.Errorf("negative size %d: %w", size, errdefs.ErrInvalidArgument)
	}
	m, err := d.mapFor(name, kind)
	if err != nil {
		return err
	}
	if err := d.cutTail(m, min(size, m.info.Size)); err != nil {
		return err
	}
	d.setSize(m, size)
	return nil
}

// put stores one block for map m, counting it in the map's statistics.
func (d *Draft) put(m *draftMap, data []byte) (cas.ID, error) {
	before := d.w.Stats()
	id, err := d.w.Put(data)
	if err != nil {
		return id, err
	}
	m.count(before, d.w.Stats())
	return id, nil
}

// cutTail zeroes the bytes at and past size in the block that holds size,
// so that they read zero once the map is longer, as blocks past the end do.
// A block written by this draft is not readable until Commit; it keeps its
// bytes (a limit of the store's Writer).
func (d *Draft) cutTail(m *draftMap, size int64) error {
	if size%cas.ChunkSize == 0 {
		return nil
	}
	n := uint64(size / cas.ChunkSize)
	id, ok := m.changes[n]
	if !ok {
		id = m.baseID(n)
	}
	if id == cas.ZeroID {
		return nil
	}
	buf, err := d.g.store.Get(id, nil)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("block %d: %w", n, err)
	}
	tail := buf[size%cas.ChunkSize:]
	if !slices.ContainsFunc(tail, func(b byte) bool { return b != 0 }) {
		return nil
	}
	clear(tail)
	id, err = d.put(m, buf)
	if err != nil {
		return err
	}
	m.record(n, id)
	return nil
}

func (d *Draft) setSize(m *draftMap, size int64) {
	m.info.Size = size
	limit := blocksOf(size)
	for n := range m.changes {
		if n >= limit {
			delete(m.changes, n)
		}
	}
	if m.base != nil {
		// Blocks past the end must read as zero if the map grows again.
		t := m.base.clone()
		t.truncate(limit)
		t.freeze()
		m.base = t
	}
}

// delta returns the blocks below the map's size that differ from the
// parent's map: the written ones, and those a shrink cut off (they read
// zero now, so a map that grew again must not show the parent's blocks).
func (m *draftMap) delta() []change {
	parentID := func(n uint64) cas.ID {
		if m.parent == nil {
			return cas.ZeroID
		}
		return m.parent.get(n)
	}
	changes := make([]change, 0, len(m.changes))
	for n, id := range m.changes {
		if id != parentID(n) {
			changes = append(changes, change{n, id})
		}
	}
	if m.base != m.parent {
		limit := blocksOf(m.info.Size)
		_ = m.parent.each(func(n uint64, _ cas.ID) error {
			if n < limit && m.base.get(n) == cas.ZeroID {
				if _, written := m.changes[n]; !written {
					changes = append(changes, change{n, cas.ZeroID})
				}
			}
			return nil
		})
	}
	return changes
}

// Abort drops the draft. Chunks it already stored are reclaimed by GC.
func (d *Draft) Abort() {
	if d.w != nil {
		d.w.Abort()
		d.w = nil
	}
}

// Commit makes the draft a snapshot called name. The chunks are made durable
// first, then the snapshot's record and deltas are written in one
// transaction: a crash leaves the whole snapshot or none of it.
func (d *Draft) Commit(name string, labels map[string]string) (Snapshot, error) {
	if d.w == nil {
		return Snapshot{}, fmt.Errorf("image already committed or aborted: %w", errdefs.ErrFailedPrecondition)
	}
	defer d.Abort()
	if err := ValidateName(name); err != nil {
		return Snapshot{}, err
	}
	g := d.g
	if _, err := g.Get(name); err == nil {
		return Snapshot{}, fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
	}
	// The last pack's fsync runs while the deltas are encoded.
	if err := d.w.Seal(); err != nil {
		return Snapshot{}, fmt.Errorf("storing chunks: %w", err)
	}
	snap := Snapshot{Name: name, Created: time.Now().UTC(), Labels: labels}
	if d.parent != nil {
		snap.Parent = d.parent.Name
	}
	deltas := map[string][]byte{}
	for _, mn := range d.order {
		m := d.maps[mn]
		changes := m.delta()
		m.info.Changed = int64(len(changes))
		deltas[mn] = encodeDelta(changes)
		snap.Maps = append(snap.Maps, m.info)
	}
	rec, err := json.Marshal(snap)
	if err != nil {
		return Snapshot{}, err
	}
	// Lock order: the store's write lock (held by d.w), then g.mu.
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := d.w.Commit(); err != nil {
		d.w = nil
		return Snapshot{}, fmt.Errorf("storing chunks: %w", err)
	}
	d.w = nil
	err = g.db.Update(func(tx *bolt.Tx) error {
		snaps := tx.Bucket(bucketSnapshots)
		if snaps.Get([]byte(name)) != nil {
			return fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
		}
		if snap.Parent != "" {
			// The parent the deltas are against, not another of its name.
			p, err := getSnapshot(tx, snap.Parent)
			if errors.Is(err, errdefs.ErrNotFound) || err == nil && !p.Created.Equal(d.parent.Created) {
				return fmt.Errorf("parent snapshot %q was removed: %w", snap.Parent, errdefs.ErrNotFound)
			}
			if err != nil {
				return err
			}
		}
		for mn, delta := range deltas {
			if err := tx.Bucket(bucketDeltas).Put(deltaKey(name, mn), delta); err != nil {
				return err
			}
		}
		return snaps.Put([]byte(name), rec)
	})
	if err != nil {
		return Snapshot{}, fmt.Errorf("committing snapshot %q: %w", name, dbErr(err))
	}
	return snap, nil
}

// IngestOptions describe a file to turn into a snapshot with one map.
type IngestOptions struct {
	Name   string
	Parent string
	Kind   Kind
	// MapName defaults to the kind ("disk" or "memory").
	MapName  string
	Labels   map[string]string
	Progress func(done int64)
}

// Ingest stores what r holds as a new snapshot with one map (the parent's
// other maps are inherited unchanged).
func (g *Graph) Ingest(ctx context.Context, r io.Reader, opts IngestOptions) (Snapshot, error) {
	if err := ValidateName(opts.Name); err != nil {
		return Snapshot{}, err
	}
	if _, err := g.Get(opts.Name); err == nil {
		return Snapshot{}, fmt.Errorf("snapshot %q already exists: %w", opts.Name, errdefs.ErrAlreadyExists)
	}
	if opts.Kind == "" {
		opts.Kind = KindDisk
	}
	if opts.MapName == "" {
		opts.MapName = string(opts.Kind)
	}
	d, err := g.NewDraft(opts.Parent)
	if err != nil {
		return Snapshot{}, err
	}
	defer d.Abort()
	if _, err := d.WriteMap(ctx, opts.MapName, opts.Kind, r, opts.Progress); err != nil {
		return Snapshot{}, err
	}
	return d.Commit(opts.Name, opts.Labels)
}
