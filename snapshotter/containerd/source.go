package containerd

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// Source is the snapshot behind the Source of a mount the snapshotter
// returned.
type Source struct {
	// Key is containerd's key of the active or view snapshot.
	Key  string
	Kind snapshots.Kind
	// ID is containerd's snapshot id; the image is named after it.
	ID string
	// Image is the image file: a raw disk image a VMM can attach as it is.
	Image string
	// Base is the graph snapshot whose Map the image began as (the
	// committed parent's), or "" when the image began as a fresh
	// filesystem. A view's image never changes: it is Base's map, byte for
	// byte.
	Base string
	Map  string
}

// SnapshotForSource returns the snapshot behind source, the Source path of a
// mount from Prepare, View or Mounts: what a VMM needs to attach the image,
// or for a view Base's block map, without a loop device.
func (s *Snapshotter) SnapshotForSource(ctx context.Context, source string) (Source, error) {
	path, err := filepath.Abs(source)
	if err != nil {
		return Source{}, err
	}
	id := filepath.Base(path)
	if filepath.Dir(path) != s.images || !isID(id) {
		return Source{}, fmt.Errorf("%s is not an image of this snapshotter (%s/<id>): %w", source, s.images, errdefs.ErrInvalidArgument)
	}
	src := Source{ID: id, Image: path, Map: MapName}
	err = s.view(ctx, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		key, ok := ids[id]
		if !ok {
			return fmt.Errorf("no snapshot has image %s: %w", source, errdefs.ErrNotFound)
		}
		_, info, _, err := storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		if info.Kind == snapshots.KindCommitted {
			return fmt.Errorf("no active snapshot or view has image %s: snapshot %q was committed from it, and a committed snapshot has no image: %w",
				source, key, errdefs.ErrNotFound)
		}
		snap, err := storage.GetSnapshot(ctx, key)
		if err != nil {
			return fmt.Errorf("image %s: %w", source, err)
		}
		src.Key, src.Kind = key, snap.Kind
		if len(snap.ParentIDs) > 0 {
			src.Base = s.graphName(snap.ParentIDs[0])
		}
		return nil
	})
	if err != nil {
		return Source{}, err
	}
	return src, nil
}
