package containerd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

const (
	// MapName is the block map of a graph snapshot that holds the
	// filesystem image.
	MapName = "disk"
	// DefaultSize is the size of a new image when neither the
	// containerd.io/snapshot/max-size label nor WithDefaultSize says.
	DefaultSize int64 = 1 << 30
	// DefaultPrefix starts the name of every graph snapshot the snapshotter
	// makes; the rest is containerd's snapshot id.
	DefaultPrefix = "ctd-"

	// FSType is the filesystem in every image.
	FSType = "ext4"

	// LabelName is the graph snapshot's label that holds containerd's name
	// of the committed snapshot, for the operator's view (`boxd store ls`).
	LabelName = "containerd.name"

	minSize int64 = 1 << 20
	maxSize int64 = 1 << 46
)

type config struct {
	defaultSize int64
	prefix      string
}

// Opt configures a Snapshotter.
type Opt func(*config) error

// WithDefaultSize sets the size, in bytes, of an image made without a parent
// when the containerd.io/snapshot/max-size label does not give one.
func WithDefaultSize(size int64) Opt {
	return func(c *config) error {
		if size < minSize || size > maxSize {
			return fmt.Errorf("default image size %d: want %d to %d bytes: %w", size, minSize, maxSize, errdefs.ErrInvalidArgument)
		}
		c.defaultSize = roundUp(size)
		return nil
	}
}

// WithGraphPrefix sets the prefix of the graph snapshots' names. Two
// snapshotters on one graph need different prefixes: Cleanup removes every
// graph snapshot called <prefix><digits> that its records do not name.
func WithGraphPrefix(prefix string) Opt {
	return func(c *config) error {
		// The longest name is the prefix and a 20-digit id.
		if err := snapshotter.ValidateName(prefix + "18446744073709551615"); err != nil || prefix == "" {
			return fmt.Errorf("graph prefix %q: use 1 to 108 characters from A-Z a-z 0-9 . _ -: %w", prefix, errdefs.ErrInvalidArgument)
		}
		c.prefix = prefix
		return nil
	}
}

// Snapshotter is containerd's snapshotter on boxd's graph. NewSnapshotter
// returns one as a snapshots.Snapshotter; assert the type for
// SnapshotForSource. It also implements snapshots.Cleaner.
type Snapshotter struct {
	images string
	g      *snapshotter.Graph
	ms     *storage.MetaStore
	cfg    config
	closed atomic.Bool

	mkfs, debugfs string
}

var (
	_ snapshots.Snapshotter = (*Snapshotter)(nil)
	_ snapshots.Cleaner     = (*Snapshotter)(nil)
)

// NewSnapshotter returns a snapshotter that keeps its records and images
// under root and its committed snapshots in g. The caller keeps g and closes
// it after the snapshotter.
func NewSnapshotter(root string, g *snapshotter.Graph, opts ...Opt) (snapshots.Snapshotter, error) {
	if g == nil {
		return nil, fmt.Errorf("no snapshot graph: %w", errdefs.ErrInvalidArgument)
	}
	cfg := config{defaultSize: DefaultSize, prefix: DefaultPrefix}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, err
		}
	}
	mkfs, err := lookTool("mkfs.ext4")
	if err != nil {
		return nil, err
	}
	debugfs, err := lookTool("debugfs")
	if err != nil {
		return nil, err
	}
	root, err = filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	images := filepath.Join(root, "images")
	if err := os.MkdirAll(images, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", images, err)
	}
	ms, err := storage.NewMetaStore(filepath.Join(root, "metadata.db"), func(o *bolt.Options) error {
		o.Timeout = time.Second
		return nil
	})
	if err != nil {
		return nil, err
	}
	s := &Snapshotter{images: images, g: g, ms: ms, cfg: cfg, mkfs: mkfs, debugfs: debugfs}
	// The MetaStore opens its file on the first transaction: open it now,
	// so that a root in use is an error here rather than a hang later.
	if err := ms.WithTransaction(context.Background(), false, func(context.Context) error { return nil }); err != nil {
		ms.Close()
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("snapshotter root %s is in use by another process: %w", root, errdefs.ErrUnavailable)
		}
		return nil, fmt.Errorf("opening snapshotter metadata: %w", err)
	}
	return s, nil
}

// lookTool finds one of e2fsprogs' programs, in PATH or in /sbin.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found: install e2fsprogs: %w", name, errdefs.ErrFailedPrecondition)
}

func roundUp(size int64) int64 { return (size + cas.ChunkSize - 1) &^ (cas.ChunkSize - 1) }

// graphName is the graph snapshot of containerd's snapshot id.
func (s *Snapshotter) graphName(id string) string { return s.cfg.prefix + id }

// ownsGraphName reports whether name is one of this snapshotter's graph
// snapshots.
func (s *Snapshotter) ownsGraphName(name string) bool {
	id, ok := strings.CutPrefix(name, s.cfg.prefix)
	return ok && isID(id)
}

// isID reports whether id is a snapshot id as the MetaStore writes them.
func isID(id string) bool {
	n, err := strconv.ParseUint(id, 10, 64)
	return err == nil && id == strconv.FormatUint(n, 10)
}

func (s *Snapshotter) imagePath(id string) string { return filepath.Join(s.images, id) }

// view and update run fn in a read or write transaction of the MetaStore.
func (s *Snapshotter) view(ctx context.Context, fn storage.TransactionCallback) error {
	if s.closed.Load() {
		return fmt.Errorf("snapshotter is closed: %w", errdefs.ErrUnavailable)
	}
	return s.ms.WithTransaction(ctx, false, fn)
}

func (s *Snapshotter) update(ctx context.Context, fn storage.TransactionCallback) error {
	if s.closed.Load() {
		return fmt.Errorf("snapshotter is closed: %w", errdefs.ErrUnavailable)
	}
	return s.ms.WithTransaction(ctx, true, fn)
}

// Stat returns the info of an active, view or committed snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	var info snapshots.Info
	err := s.view(ctx, func(ctx context.Context) error {
		var err error
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return snapshots.Info{}, fmt.Errorf("snapshot %q: %w", key, err)
	}
	return info, nil
}

// Update changes a snapshot's labels (the only mutable fields).
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (snapshots.Info, error) {
	var out snapshots.Info
	err := s.update(ctx, func(ctx context.Context) error {
		var err error
		out, err = storage.UpdateInfo(ctx, info, fieldpaths...)
		return err
	})
	if err != nil {
		return snapshots.Info{}, fmt.Errorf("updating snapshot %q: %w", info.Name, err)
	}
	return out, nil
}

// Usage returns the size of the snapshot's non-zero blocks that differ from
// its parent's.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id, base string
		info     snapshots.Info
		usage    snapshots.Usage
	)
	err := s.view(ctx, func(ctx context.Context) error {
		var err error
		id, info, usage, err = storage.GetInfo(ctx, key)
		if err != nil || info.Kind != snapshots.KindActive {
			return err
		}
		base, err = s.parentGraph(ctx, info.Parent)
		return err
	})
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of snapshot %q: %w", key, err)
	}
	if info.Kind != snapshots.KindActive {
		return usage, nil
	}
	size, err := s.imageUsage(ctx, s.imagePath(id), base)
	if err != nil {
		return snapshots.Usage{}, fmt.Errorf("usage of snapshot %q: %w", key, err)
	}
	return snapshots.Usage{Size: size}, nil
}

// parentGraph returns the graph snapshot of committed snapshot parent, or ""
// for none. It needs a transaction in ctx.
func (s *Snapshotter) parentGraph(ctx context.Context, parent string) (string, error) {
	if parent == "" {
		return "", nil
	}
	pid, _, _, err := storage.GetInfo(ctx, parent)
	if err != nil {
		return "", fmt.Errorf("parent %q: %w", parent, err)
	}
	return s.graphName(pid), nil
}

// Mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var snap storage.Snapshot
	err := s.view(ctx, func(ctx context.Context) error {
		var err error
		snap, err = storage.GetSnapshot(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts of snapshot %q: %w", key, err)
	}
	return s.mounts(snap), nil
}

func (s *Snapshotter) mounts(snap storage.Snapshot) []mount.Mount {
	opts := []string{"loop"}
	if snap.Kind == snapshots.KindView {
		opts = append(opts, "ro")
	}
	return []mount.Mount{{Type: FSType, Source: s.imagePath(snap.ID), Options: opts}}
}

// Prepare makes an active snapshot: a writable image of parent's filesystem,
// or of a fresh one.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View makes a view: a read-only image of parent's filesystem, or of an
// empty one.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) ([]mount.Mount, error) {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return nil, err
		}
	}
	size := s.cfg.defaultSize
	if v, ok := base.Labels[snapshots.LabelSnapshotMaxSize]; ok {
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil || n < minSize || n > maxSize {
			return nil, fmt.Errorf("snapshot %q: label %s=%q: want a size in bytes from %d to %d: %w",
				key, snapshots.LabelSnapshotMaxSize, v, minSize, maxSize, errdefs.ErrInvalidArgument)
		}
		size = roundUp(n)
	}
	var snap storage.Snapshot
	err := s.update(ctx, func(ctx context.Context) error {
		if parent != "" {
			if _, _, _, err := storage.GetInfo(ctx, parent); errdefs.IsNotFound(err) {
				return fmt.Errorf("parent %q does not exist: %w", parent, errdefs.ErrNotFound)
			}
		}
		var err error
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		// The image is renamed into place before the record commits; if
		// the commit fails, Cleanup removes it.
		path := s.imagePath(snap.ID)
		if len(snap.ParentIDs) > 0 {
			return s.exportImage(ctx, s.graphName(snap.ParentIDs[0]), parent, path)
		}
		return s.makeImage(ctx, path, size)
	})
	if err != nil {
		return nil, fmt.Errorf("creating %s snapshot %q: %w", strings.ToLower(kind.String()), key, err)
	}
	return s.mounts(snap), nil
}

// crashPoint is called at the points of Commit where a crash is most
// telling; tests set it.
var crashPoint = func(string) {}

// Commit turns active snapshot key into committed snapshot name: the image's
// blocks go into the graph as a delta against the parent's snapshot.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var base snapshots.Info
	for _, o := range opts {
		if err := o(&base); err != nil {
			return err
		}
	}
	var image string
	// Order (see the package documentation): the graph snapshot is
	// written inside the MetaStore's write transaction, before it
	// commits; the image is removed after. A crash before the transaction
	// commits leaves the active snapshot whole and an unreferenced graph
	// snapshot; after it, the committed snapshot and an unreferenced image
	// file. Cleanup collects either leftover.
	err := s.update(ctx, func(ctx context.Context) error {
		id, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind != snapshots.KindActive {
			return fmt.Errorf("it is a %s snapshot; only an active snapshot can be committed: %w",
				strings.ToLower(info.Kind.String()), errdefs.ErrFailedPrecondition)
		}
		if base.Parent != "" && base.Parent != info.Parent {
			return fmt.Errorf("cannot change its parent from %q to %q at commit: its image is a whole filesystem: %w",
				info.Parent, base.Parent, errdefs.ErrInvalidArgument)
		}
		if _, _, _, err := storage.GetInfo(ctx, name); err == nil {
			return fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
		} else if !errdefs.IsNotFound(err) {
			return err
		}
		parent, err := s.parentGraph(ctx, info.Parent)
		if err != nil {
			return err
		}
		image = s.imagePath(id)
		gname := s.graphName(id)
		if err := s.dropStale(gname); err != nil {
			return err
		}
		usage, err := s.ingest(ctx, image, gname, parent, name)
		if err != nil {
			return err
		}
		crashPoint("graph-committed")
		if _, err := storage.CommitActive(ctx, key, name, usage, opts...); err != nil {
			// The transaction rolls back: nothing refers to the graph
			// snapshot.
			if rerr := s.g.Remove(gname); rerr != nil {
				log.G(ctx).WithError(rerr).WithField("snapshot", gname).Warn("removing an unreferenced graph snapshot; Cleanup will")
			}
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("committing %q as %q: %w", key, name, err)
	}
	crashPoint("metadata-committed")
	if err := os.Remove(image); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("image", image).Warn("removing a committed image; Cleanup will")
	}
	return nil
}

// dropStale removes graph snapshot gname, which no record refers to: a
// Commit of the same active snapshot that crashed before its transaction
// committed left it.
func (s *Snapshotter) dropStale(gname string) error {
	err := s.g.Remove(gname)
	if err == nil || errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	return fmt.Errorf("removing graph snapshot %s left by an earlier attempt: %w", gname, err)
}

// Remove deletes a snapshot of any kind that has no children.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	var (
		id   string
		kind snapshots.Kind
	)
	// The record goes first: once it is gone nothing refers to the graph
	// snapshot or the image, and a crash leaves them for Cleanup.
	err := s.update(ctx, func(ctx context.Context) error {
		var err error
		id, kind, err = storage.Remove(ctx, key)
		return err
	})
	if err != nil {
		return fmt.Errorf("failed to remove snapshot %q: %w", key, err)
	}
	if kind == snapshots.KindCommitted {
		gname := s.graphName(id)
		err := s.g.Remove(gname)
		switch {
		case err == nil, errors.Is(err, errdefs.ErrNotFound):
		case errors.Is(err, errdefs.ErrFailedPrecondition):
			log.G(ctx).WithError(err).WithField("snapshot", gname).Info("keeping the graph snapshot of a removed snapshot: other graph snapshots are built on it")
		default:
			log.G(ctx).WithError(err).WithField("snapshot", gname).Warn("removing a graph snapshot; Cleanup will")
		}
		return nil
	}
	if err := os.Remove(s.imagePath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("image", s.imagePath(id)).Warn("removing an image; Cleanup will")
	}
	return nil
}

// Walk calls fn for every snapshot that matches the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.view(ctx, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, fn, filters...)
	})
}

// Cleanup removes graph snapshots and image files that no record refers to
// (what a crash leaves), then deletes the chunks no snapshot of the graph
// references.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	err := s.update(ctx, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		committed := map[string]bool{}
		images := map[string]bool{}
		for id, key := range ids {
			_, info, _, err := storage.GetInfo(ctx, key)
			if err != nil {
				return err
			}
			if info.Kind == snapshots.KindCommitted {
				committed[s.graphName(id)] = true
			} else {
				images[id] = true
			}
		}
		all, err := s.g.List()
		if err != nil {
			return err
		}
		var errs []error
		// Children before parents.
		for i := len(all) - 1; i >= 0; i-- {
			name := all[i].Name
			if !s.ownsGraphName(name) || committed[name] {
				continue
			}
			err := s.g.Remove(name)
			switch {
			case err == nil, errors.Is(err, errdefs.ErrNotFound):
			case errors.Is(err, errdefs.ErrFailedPrecondition):
				// Another user of the graph built on it; it stays
				// while they need it.
				log.G(ctx).WithError(err).WithField("snapshot", name).Info("keeping an unreferenced graph snapshot that has children")
			default:
				errs = append(errs, err)
			}
		}
		entries, err := os.ReadDir(s.images)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if !images[e.Name()] {
				if err := os.Remove(filepath.Join(s.images, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
					errs = append(errs, err)
				}
			}
		}
		return errors.Join(errs...)
	})
	if err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if _, err := s.g.GC(ctx, cas.GCOptions{}); err != nil {
		return fmt.Errorf("cleanup: collecting the store's garbage: %w", err)
	}
	return nil
}

// Close closes the snapshotter's records. The graph stays open: it is the
// caller's. Closing twice is not an error.
func (s *Snapshotter) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	return s.ms.Close()
}
