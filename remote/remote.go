package remote

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Folders of the bucket.
const (
	packsDir     = "packs/"
	indexDir     = "index/"
	snapshotsDir = "snapshots/"
	boxesDir     = "boxes/"
	leasesDir    = "leases/"
)

// RootToken stands for the local root in the labels of a manifest: a host
// path under the root becomes one under the reading host's root.
const RootToken = "$BOXD_ROOT"

// segMagic begins an index segment.
var segMagic = []byte("BOXDSEG1")

// Local state, in ROOT/remote.db.
var (
	bucketUploaded = []byte("uploaded") // local pack number → remote pack name
	bucketPending  = []byte("pending")  // box → when its push failed
	bucketSegments = []byte("segments") // index segment key → its bytes (immutable, so kept)
	bucketMeta     = []byte("meta")
	keyHost        = []byte("host")
)

// Config configures Open.
type Config struct {
	Bucket Bucket
	Graph  *snapshotter.Graph
	// Root is the local root: label values under it are stored under
	// RootToken, and ROOT/remote.db keeps what was uploaded.
	Root string
	// DropLabels are labels that name host files of no use elsewhere (a
	// frozen disk overlay): they are left out of manifests.
	DropLabels []string
	Logger     *slog.Logger
}

// Remote is a local graph's link to a bucket. Its methods are safe for
// concurrent use.
type Remote struct {
	cfg  Config
	db   *bolt.DB
	host string
	log  *slog.Logger

	// mu protects index and loaded.
	mu     sync.Mutex
	index  map[cas.ID]chunkAt
	loaded map[string]bool // index segment keys read
}

// chunkAt is where a chunk lies in the bucket.
type chunkAt struct {
	pack  string // HEX of packs/HEX.pack
	entry cas.Entry
}

// Open links cfg.Graph to cfg.Bucket, with its state in cfg.Root.
func Open(cfg Config) (*Remote, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	db, err := bolt.Open(filepath.Join(cfg.Root, "remote.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, fmt.Errorf("remote state of %s is in use by another process: %w", cfg.Root, errdefs.ErrUnavailable)
	}
	if err != nil {
		return nil, fmt.Errorf("opening remote state: %w", err)
	}
	r := &Remote{cfg: cfg, db: db, log: cfg.Logger, index: map[cas.ID]chunkAt{}, loaded: map[string]bool{}}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketUploaded, bucketPending, bucketSegments, bucketMeta} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if h := meta.Get(keyHost); h != nil {
			r.host = string(h)
			return nil
		}
		r.host = newHostID()
		return meta.Put(keyHost, []byte(r.host))
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialising remote state: %w", err)
	}
	return r, nil
}

// newHostID names this root among the hosts that share a bucket: the host
// name and random bytes, as two roots may share a host.
func newHostID() string {
	name, _ := os.Hostname()
	var b [6]byte
	_, _ = rand.Read(b[:])
	return name + "-" + hex.EncodeToString(b[:])
}

// Host is this root's name in leases.
func (r *Remote) Host() string { return r.host }

// Close closes the local state.
func (r *Remote) Close() error { return r.db.Close() }

// refreshIndex reads the index segments the bucket has that r has not
// read yet, from the local copy when there is one.
func (r *Remote) refreshIndex(ctx context.Context) error {
	objs, err := r.cfg.Bucket.List(ctx, indexDir)
	if err != nil {
		return err
	}
	for _, o := range objs {
		r.mu.Lock()
		done := r.loaded[o.Key]
		r.mu.Unlock()
		if done || !strings.HasSuffix(o.Key, ".idx") {
			continue
		}
		var seg []byte
		_ = r.db.View(func(tx *bolt.Tx) error {
			if v := tx.Bucket(bucketSegments).Get([]byte(o.Key)); v != nil {
				seg = append([]byte(nil), v...)
			}
			return nil
		})
		if seg == nil {
			if seg, err = r.cfg.Bucket.Get(ctx, o.Key); err != nil {
				return err
			}
		}
		entries, err := decodeSegment(seg)
		if err != nil {
			return fmt.Errorf("index segment %s: %w", o.Key, err)
		}
		if err := r.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketSegments).Put([]byte(o.Key), seg) }); err != nil {
			return err
		}
		r.addSegment(o.Key, entries)
	}
	return nil
}

// addSegment puts the entries of index segment key into the index.
func (r *Remote) addSegment(key string, entries []cas.Entry) {
	pack := strings.TrimSuffix(strings.TrimPrefix(key, indexDir), ".idx")
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range entries {
		if _, ok := r.index[e.ID]; !ok {
			r.index[e.ID] = chunkAt{pack: pack, entry: e}
		}
	}
	r.loaded[key] = true
}

// lookup returns where chunk id lies in the bucket.
func (r *Remote) lookup(id cas.ID) (chunkAt, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	c, ok := r.index[id]
	return c, ok
}

// encodeSegment is the index segment of a pack of size bytes whose footer
// and trailer are tail.
func encodeSegment(size int64, tail []byte) []byte {
	seg := append([]byte(nil), segMagic...)
	seg = binary.LittleEndian.AppendUint64(seg, uint64(size))
	return append(seg, tail...)
}

// decodeSegment returns the entries of an index segment; the footer's
// checksums are checked.
func decodeSegment(seg []byte) ([]cas.Entry, error) {
	if len(seg) < len(segMagic)+8 || string(seg[:len(segMagic)]) != string(segMagic) {
		return nil, fmt.Errorf("not an index segment: %w", errdefs.ErrDataLoss)
	}
	size := int64(binary.LittleEndian.Uint64(seg[len(segMagic):]))
	return cas.DecodeFooter(seg[len(segMagic)+8:], size)
}

func packKey(hexName string) string  { return packsDir + hexName + ".pack" }
func indexKey(hexName string) string { return indexDir + hexName + ".idx" }
func snapshotKey(name string) string { return snapshotsDir + name + ".json" }
func boxKey(name string) string      { return boxesDir + name + ".json" }
func leaseKey(name string) string    { return leasesDir + name + ".json" }
