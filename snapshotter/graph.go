package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"golang.org/x/sys/unix"
)

// Kind says what a block map holds.
type Kind string

// Kinds of block map.
const (
	KindDisk   Kind = "disk"
	KindMemory Kind = "memory"
	// KindState holds a small blob: a machine's registers and device state.
	KindState Kind = "state"
)

// storedRaw reports whether the store keeps the new chunks of a map of kind
// k uncompressed. Memory is: a lazy restore reads it back a page per fault,
// and decoding an s2 page costs that fault more than its hash check does,
// for a saving of disk that Compact makes later anyway, and better.
func (k Kind) storedRaw() bool { return k == KindMemory }

// ParseKind accepts "disk" or "memory".
func ParseKind(s string) (Kind, error) {
	switch k := Kind(s); k {
	case KindDisk, KindMemory:
		return k, nil
	}
	return "", fmt.Errorf("unknown kind %q: want disk or memory: %w", s, errdefs.ErrInvalidArgument)
}

// MapInfo describes one block map of a snapshot.
type MapInfo struct {
	Name string `json:"name"`
	Kind Kind   `json:"kind"`
	// Size is the image's logical size in bytes; export writes exactly this.
	Size int64 `json:"size"`
	// Changed counts the blocks recorded in the delta against the parent.
	Changed int64 `json:"changed_blocks"`
	// Write statistics, as measured when the map was written.
	ZeroChunks   int64 `json:"zero_chunks"`
	NewChunks    int64 `json:"new_chunks"`
	ReusedChunks int64 `json:"reused_chunks"`
	NewStored    int64 `json:"new_stored_bytes"`
}

// Snapshot is an immutable, named set of block maps with an optional parent.
type Snapshot struct {
	Name    string            `json:"name"`
	Parent  string            `json:"parent,omitempty"`
	Created time.Time         `json:"created"`
	Labels  map[string]string `json:"labels,omitempty"`
	Maps    []MapInfo         `json:"maps"`
}

// Map returns the snapshot's map called name.
func (s *Snapshot) Map(name string) (MapInfo, bool) {
	for _, m := range s.Maps {
		if m.Name == name {
			return m, true
		}
	}
	return MapInfo{}, false
}

// Size returns the sum of the logical sizes of the snapshot's maps.
func (s *Snapshot) Size() int64 {
	var n int64
	for _, m := range s.Maps {
		n += m.Size
	}
	return n
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// ValidateName checks a snapshot or map name: 1 to 128 of A-Z a-z 0-9 . _ -,
// and not "." or "..".
func ValidateName(name string) error {
	if !nameRE.MatchString(name) || name == "." || name == ".." {
		return fmt.Errorf("invalid name %q: use 1 to 128 characters from A-Z a-z 0-9 . _ -: %w", name, errdefs.ErrInvalidArgument)
	}
	return nil
}

var (
	bucketSnapshots = []byte("snapshots")
	bucketDeltas    = []byte("deltas")
)

func deltaKey(snap, m string) []byte { return []byte(snap + "\x00" + m) }

// Graph is the snapshot graph over one chunk store. Its methods are safe for
// concurrent use: reads run in parallel; changes are serialised.
type Graph struct {
	root  string
	store *cas.Store
	db    *bolt.DB

	// mu serialises changes to the graph. Lock order: the store's write
	// lock (a cas.Writer), then mu.
	mu sync.Mutex

	cache *tableCache
}

// Open opens or creates the graph and its store under root.
func Open(root string) (*Graph, error) {
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("creating root %s: %w", root, err)
	}
	// access(2) answers for root too: EROFS on a read-only mount.
	if err := unix.Access(root, unix.W_OK); err != nil {
		return nil, fmt.Errorf("root %s is not writable: %w", root, err)
	}
	db, err := bolt.Open(filepath.Join(root, "meta.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("root %s is in use by another boxd process: %w", root, errdefs.ErrUnavailable)
	}
	if err != nil {
		return nil, fmt.Errorf("opening snapshot metadata: %w", dbErr(err))
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketSnapshots, bucketDeltas} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising snapshot metadata: %w", dbErr(err))
	}
	store, err := cas.Open(filepath.Join(root, "cas"), cas.Options{})
	if err != nil {
		db.Close()
		return nil, err
	}
	return &Graph{root: root, store: store, db: db, cache: newTableCache(8)}, nil
}

// Store returns the chunk store under the graph.
func (g *Graph) Store() *cas.Store { return g.store }

// Root returns the graph's root folder.
func (g *Graph) Root() string { return g.root }

// Close closes the metadata and the store.
func (g *Graph) Close() error {
	return errors.Join(g.db.Close(), g.store.Close())
}

// Get returns the snapshot called name.
func (g *Graph) Get(name string) (Snapshot, error) {
	var s Snapshot
	err := g.db.View(func(tx *bolt.Tx) error {
		var err error
		s, err = getSnapshot(tx, name)
		return err
	})
	return s, err
}

func getSnapshot(tx *bolt.Tx, name string) (Snapshot, error) {
	var s Snapshot
	v := tx.Bucket(bucketSnapshots).Get([]byte(name))
	if v == nil {
		return s, fmt.Errorf("snapshot %q: %w", name, errdefs.ErrNotFound)
	}
	if err := json.Unmarshal(v, &s); err != nil {
		return s, fmt.Errorf("snapshot %q: record unreadable: %w: %w", name, err, errdefs.ErrDataLoss)
	}
	return s, nil
}

// List returns every snapshot, parents before children, then by name.
func (g *Graph) List() ([]Snapshot, error) {
	var all []Snapshot
	err := g.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketSnapshots).ForEach(func(k, v []byte) error {
			var s Snapshot
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("snapshot %q: record unreadable: %w: %w", k, err, errdefs.ErrDataLoss)
			}
			all = append(all, s)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return topoSort(all), nil
}

// topoSort orders snapshots so every parent precedes its children.
func topoSort(all []Snapshot) []Snapshot {
	sort.Slice(all, func(i, j int) bool { return all[i].Name < all[j].Name })
	children := map[string][]Snapshot{}
	byName := map[string]bool{}
	for _, s := range all {
		byName[s.Name] = true
	}
	var out []Snapshot
	for _, s := range all {
		if s.Parent == "" || !byName[s.Parent] {
			out = append(out, s)
		} else {
			children[s.Parent] = append(children[s.Parent], s)
		}
	}
	for i := 0; i < len(out); i++ {
		out = append(out, children[out[i].Name]...)
	}
	return out
}

// Children returns the names of the snapshots whose parent is name.
func (g *Graph) Children(name string) ([]string, error) {
	all, err := g.List()
	if err != nil {
		return nil, err
	}
	var kids []string
	for _, s := range all {
		if s.Parent == name {
			kids = append(kids, s.Name)
		}
	}
	return kids, nil
}

// Remove deletes a snapshot that has no children. Its chunks stay in the
// store until GC.
func (g *Graph) Remove(name string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, err := g.Get(name); err != nil {
		return err
	}
	kids, err := g.Children(name)
	if err != nil {
		return err
	}
	if len(kids) > 0 {
		return fmt.Errorf("snapshot %q has children (%s); remove them first: %w", name, strings.Join(kids, ", "), errdefs.ErrFailedPrecondition)
	}
	err = g.db.Update(func(tx *bolt.Tx) error {
		s, err := getSnapshot(tx, name)
		if err != nil {
			return err
		}
		ws := tx.Bucket(bucketWorkingSets)
		for _, m := range s.Maps {
			if err := tx.Bucket(bucketDeltas).Delete(deltaKey(name, m.Name)); err != nil {
				return err
			}
			if ws != nil {
				if err := ws.Delete(deltaKey(name, m.Name)); err != nil {
					return err
				}
			}
		}
		return tx.Bucket(bucketSnapshots).Delete([]byte(name))
	})
	g.cache.forget(name)
	return dbErr(err)
}

// dbErr marks a metadata write that ran out of disk as errdefs.ErrResourceExhausted, as
// the store marks its own.
func dbErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errcat.With(err, errdefs.ErrResourceExhausted)
	}
	return err
}

// delta returns the decoded delta of one map of one snapshot.
func (g *Graph) delta(snap, m string) ([]change, error) {
	var changes []change
	err := g.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketDeltas).Get(deltaKey(snap, m))
		if v == nil {
			return fmt.Errorf("snapshot %q map %q: delta missing: %w", snap, m, errdefs.ErrDataLoss)
		}
		var err error
		changes, err = decodeDelta(v)
		if err != nil {
			return fmt.Errorf("snapshot %q map %q: %w", snap, m, err)
		}
		return nil
	})
	return changes, err
}

// resolve returns the flat table of one map of a snapshot. The result is
// frozen and shared: clone it before writing.
func (g *Graph) resolve(snap Snapshot, m string) (*table, error) {
	if t := g.cache.get(snap, m); t != nil {
		return t, nil
	}
	if _, ok := snap.Map(m); !ok {
		return nil, fmt.Errorf("snapshot %q has no %q map: %w", snap.Name, m, errdefs.ErrNotFound)
	}
	// Walk up to the nearest ancestor whose table is cached (or the root),
	// then apply the deltas downwards.
	chain := []Snapshot{snap}
	var base *table
	for cur := snap; cur.Parent != ""; {
		parent, err := g.Get(cur.Parent)
		if err != nil {
			return nil, fmt.Errorf("snapshot %q: parent: %w", cur.Name, err)
		}
		if _, ok := parent.Map(m); !ok {
			break
		}
		if t := g.cache.get(parent, m); t != nil {
			base = t
			break
		}
		chain = append(chain, parent)
		cur = parent
	}
	t := &table{}
	if base != nil {
		t = base.clone()
	}
	for i := len(chain) - 1; i >= 0; i-- {
		changes, err := g.delta(chain[i].Name, m)
		if err != nil {
			return nil, err
		}
		for _, c := range changes {
			t.set(c.Block, c.ID)
		}
		mi, _ := chain[i].Map(m)
		t.truncate(blocksOf(mi.Size))
	}
	t.freeze()
	g.cache.put(snap, m, t)
	return t, nil
}

func blocksOf(size int64) uint64 { return uint64((size + cas.ChunkSize - 1) / cas.ChunkSize) }

// GC removes from the store every chunk that no snapshot references.
func (g *Graph) GC(ctx context.Context, opts cas.GCOptions) (cas.GCStats, error) {
	w := g.store.NewWriter()
	defer w.Abort()
	g.mu.Lock()
	defer g.mu.Unlock()
	live, err := g.liveSet()
	if err != nil {
		return cas.GCStats{}, err
	}
	return w.GC(ctx, func(id cas.ID) bool { _, ok := live[id]; return ok }, opts)
}

// Compact rewrites the store's freshly written packs into smaller ones
// (see cas.Store.Compact); it waits for snapshots being written.
//
// Unless opts.Keep says otherwise, the chunks of the recorded working sets
// stay out of frames: a lazy resume pushes them first, in page order and
// far apart in the store, and reading each from a frame would decode the
// whole frame (see WorkingSetChunks).
func (g *Graph) Compact(ctx context.Context, opts cas.CompactOptions) (cas.CompactStats, error) {
	if opts.Keep == nil {
		hot, err := g.WorkingSetChunks()
		if err != nil {
			return cas.CompactStats{}, err
		}
		if len(hot) > 0 {
			opts.Keep = func(id cas.ID) bool { _, ok := hot[id]; return ok }
		}
	}
	return g.store.Compact(ctx, opts)
}

// liveSet collects every chunk id any snapshot's delta names.
func (g *Graph) liveSet() (map[cas.ID]struct{}, error) {
	live := map[cas.ID]struct{}{}
	err := g.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketDeltas).ForEach(func(k, v []byte) error {
			changes, err := decodeDelta(v)
			if err != nil {
				// Refuse to collect on a damaged graph: a chunk it names
				// could be swept.
				return fmt.Errorf("delta %q: %w", k, err)
			}
			for _, c := range changes {
				live[c.ID] = struct{}{}
			}
			return nil
		})
	})
	return live, err
}

// tableCache keeps the most recently resolved tables. An entry is for one
// snapshot, not one name: a snapshot removed and made again under the same
// name has another creation time.
type tableCache struct {
	mu      sync.Mutex
	max     int
	entries []cacheEntry
}

type cacheEntry struct {
	snap, m string
	created time.Time
	t       *table
}

func newTableCache(max int) *tableCache { return &tableCache{max: max} }

func (c *tableCache) get(s Snapshot, m string) *table {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, e := range c.entries {
		if e.snap == s.Name && e.m == m && e.created.Equal(s.Created) {
			copy(c.entries[1:i+1], c.entries[:i])
			c.entries[0] = e
			return e.t
		}
	}
	return nil
}

func (c *tableCache) put(s Snapshot, m string, t *table) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries = append([]cacheEntry{{s.Name, m, s.Created, t}}, c.entries...)
	if len(c.entries) > c.max {
		c.entries = c.entries[:c.max]
	}
}

func (c *tableCache) forget(snap string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	kept := c.entries[:0]
	for _, e := range c.entries {
		if e.snap != snap {
			kept = append(kept, e)
		}
	}
	c.entries = kept
}
