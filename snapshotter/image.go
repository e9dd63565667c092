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

// Image is a writable snapshot in the making: it starts as a copy of its
// parent's maps (or empty), takes block writes, and becomes a snapshot on
// Commit. An Image holds the store's write lock until Commit or Abort, so
// only one exists at a time.
type Image struct {
	g      *Graph
	w      *cas.Writer
	parent *Snapshot
	maps   map[string]*imageMap
	order  []string
}

type imageMap struct {
	info MapInfo
	base *table // the parent's resolved map (frozen), truncated by SetSize, or nil
	// parent is the parent's resolved map as it is, which the delta is
	// against; base differs from it only where a shrink cut blocks off.
	parent  *table
	changes map[uint64]cas.ID
}

// NewImage starts an image over parent ("" for none). It waits for the
// store's write lock.
func (g *Graph) NewImage(parent string) (*Image, error) {
	img := &Image{g: g, maps: map[string]*imageMap{}}
	if parent != "" {
		p, err := g.Get(parent)
		if err != nil {
			return nil, fmt.Errorf("parent: %w", err)
		}
		img.parent = &p
		for _, m := range p.Maps {
			base, err := g.resolve(p, m.Name)
			if err != nil {
				return nil, err
			}
			img.maps[m.Name] = &imageMap{info: MapInfo{Name: m.Name, Kind: m.Kind, Size: m.Size}, base: base, parent: base, changes: map[uint64]cas.ID{}}
			img.order = append(img.order, m.Name)
		}
	}
	img.w = g.store.NewWriter()
	return img, nil
}

// mapFor returns the image's map called name, creating it empty.
func (img *Image) mapFor(name string, kind Kind) (*imageMap, error) {
	if img.w == nil {
		return nil, fmt.Errorf("image already committed or aborted: %w", errdefs.ErrFailedPrecondition)
	}
	if err := ValidateName(name); err != nil {
		return nil, fmt.Errorf("map: %w", err)
	}
	m := img.maps[name]
	if m == nil {
		m = &imageMap{info: MapInfo{Name: name, Kind: kind}, changes: map[uint64]cas.ID{}}
		img.maps[name] = m
		img.order = append(img.order, name)
	}
	if m.info.Kind != kind {
		return nil, fmt.Errorf("map %q is %s, not %s: %w", name, m.info.Kind, kind, errdefs.ErrInvalidArgument)
	}
	return m, nil
}

// count adds what the store's writer did between two of its Stats to the
// map's write statistics.
func (m *imageMap) count(before, after cas.WriteStats) {
	m.info.ZeroChunks += after.ZeroChunks - before.ZeroChunks
	m.info.NewChunks += after.NewChunks - before.NewChunks
	m.info.ReusedChunks += after.ReusedChunk - before.ReusedChunk
	m.info.NewStored += after.NewStored - before.NewStored
}

func (m *imageMap) baseID(n uint64) cas.ID {
	if m.base == nil {
		return cas.ZeroID
	}
	return m.base.get(n)
}

func (m *imageMap) record(n uint64, id cas.ID) {
	if id == m.baseID(n) {
		delete(m.changes, n)
		return
	}
	m.changes[n] = id
}

// WriteMap replaces the whole content of map name with what r holds; the
// map's size becomes the number of bytes read. progress, when not nil, is
// called with the bytes read so far.
func (img *Image) WriteMap(ctx context.Context, name string, kind Kind, r io.Reader, progress func(int64)) (MapInfo, error) {
	m, err := img.mapFor(name, kind)
	if err != nil {
		return MapInfo{}, err
	}
	before := img.w.Stats()
	clear(m.changes)
	n, err := img.w.WriteStream(ctx, r, func(i int64, id cas.ID) error {
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
	img.setSize(m, n)
	m.count(before, img.w.Stats())
	return m.info, nil
}

// WriteBlock sets block n of map name to data (zero-padded to a chunk).
// The map grows to cover the block if it is shorter.
func (img *Image) WriteBlock(name string, kind Kind, n uint64, data []byte) error {
	if len(data) > cas.ChunkSize {
		return fmt.Errorf("block of %d bytes is larger than a chunk: %w", len(data), errdefs.ErrInvalidArgument)
	}
	if n >= math.MaxInt64/cas.ChunkSize {
		return fmt.Errorf("block %d is beyond the largest image: %w", n, errdefs.ErrInvalidArgument)
	}
	m, err := img.mapFor(name, kind)
	if err != nil {
		return err
	}
	if end := int64(n+1) * cas.ChunkSize; end > m.info.Size && n != uint64(m.info.Size/cas.ChunkSize) {
		if err := img.cutTail(m, m.info.Size); err != nil {
			return err
		}
	}
	id, err := img.put(m, data)
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
func (img *Image) SetSize(name string, kind Kind, size int64) error {
	if size < 0 {
		return fmt.Errorf("negative size %d: %w", size, errdefs.ErrInvalidArgument)
	}
	m, err := img.mapFor(name, kind)
	if err != nil {
		return err
	}
	if err := img.cutTail(m, min(size, m.info.Size)); err != nil {
		return err
	}
	img.setSize(m, size)
	return nil
}

// put stores one block for map m, counting it in the map's statistics.
func (img *Image) put(m *imageMap, data []byte) (cas.ID, error) {
	before := img.w.Stats()
	id, err := img.w.Put(data)
	if err != nil {
		return id, err
	}
	m.count(before, img.w.Stats())
	return id, nil
}

// cutTail zeroes the bytes at and past size in the block that holds size,
// so that they read zero once the map is longer, as blocks past the end do.
// A block written by this image is not readable until Commit; it keeps its
// bytes (a limit of the store's Writer).
func (img *Image) cutTail(m *imageMap, size int64) error {
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
	buf, err := img.g.store.Get(id, nil)
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
	id, err = img.put(m, buf)
	if err != nil {
		return err
	}
	m.record(n, id)
	return nil
}

func (img *Image) setSize(m *imageMap, size int64) {
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
func (m *imageMap) delta() []change {
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

// Abort drops the image. Chunks it already stored are reclaimed by GC.
func (img *Image) Abort() {
	if img.w != nil {
		img.w.Abort()
		img.w = nil
	}
}

// Commit makes the image a snapshot called name. The chunks are made durable
// first, then the snapshot's record and deltas are written in one
// transaction: a crash leaves the whole snapshot or none of it.
func (img *Image) Commit(name string, labels map[string]string) (Snapshot, error) {
	if img.w == nil {
		return Snapshot{}, fmt.Errorf("image already committed or aborted: %w", errdefs.ErrFailedPrecondition)
	}
	defer img.Abort()
	if err := ValidateName(name); err != nil {
		return Snapshot{}, err
	}
	g := img.g
	if _, err := g.Get(name); err == nil {
		return Snapshot{}, fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
	}
	snap := Snapshot{Name: name, Created: time.Now().UTC(), Labels: labels}
	if img.parent != nil {
		snap.Parent = img.parent.Name
	}
	deltas := map[string][]byte{}
	for _, mn := range img.order {
		m := img.maps[mn]
		changes := m.delta()
		m.info.Changed = int64(len(changes))
		deltas[mn] = encodeDelta(changes)
		snap.Maps = append(snap.Maps, m.info)
	}
	rec, err := json.Marshal(snap)
	if err != nil {
		return Snapshot{}, err
	}
	// Lock order: the store's write lock (held by img.w), then g.mu.
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := img.w.Commit(); err != nil {
		img.w = nil
		return Snapshot{}, fmt.Errorf("storing chunks: %w", err)
	}
	img.w = nil
	err = g.db.Update(func(tx *bolt.Tx) error {
		snaps := tx.Bucket(bucketSnapshots)
		if snaps.Get([]byte(name)) != nil {
			return fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
		}
		if snap.Parent != "" {
			// The parent the deltas are against, not another of its name.
			p, err := getSnapshot(tx, snap.Parent)
			if errors.Is(err, errdefs.ErrNotFound) || err == nil && !p.Created.Equal(img.parent.Created) {
				return fmt.Errorf("parent snapshot %q was removed: %w", snap.Parent, errdefs.ErrNotFound)
			}
			if err != nil {
				return err
			}
		}
		for mn, d := range deltas {
			if err := tx.Bucket(bucketDeltas).Put(deltaKey(name, mn), d); err != nil {
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
	img, err := g.NewImage(opts.Parent)
	if err != nil {
		return Snapshot{}, err
	}
	defer img.Abort()
	if _, err := img.WriteMap(ctx, opts.MapName, opts.Kind, r, opts.Progress); err != nil {
		return Snapshot{}, err
	}
	return img.Commit(opts.Name, opts.Labels)
}
