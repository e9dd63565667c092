package guest

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// BaseDir is where boxd keeps base files under root.
func BaseDir(root string) string { return filepath.Join(root, "images") }

// BaseFile returns a raw, sparse, read-only (0444) file under dir that holds
// image's disk byte for byte: DIR/SNAPSHOT-KEY.raw, KEY a short hash of the
// disk's block map, so a rebuilt image gets a new file and boxes still
// backed by the old one keep it. The file is exported once, to a temporary
// name, synced and renamed into place; later calls return it as it is.
// Base files of images since rebuilt are left for their boxes; nothing
// removes them yet.
func BaseFile(ctx context.Context, g *snapshotter.Graph, image, dir string) (string, error) {
	img, err := GetImage(g, image)
	if err != nil {
		return "", err
	}
	path, err := SnapshotBaseFile(ctx, g, img.Snapshot, dir)
	if err != nil {
		return "", fmt.Errorf("image %q: %w", image, err)
	}
	return path, nil
}

// SnapshotBaseFile is BaseFile for any snapshot of g with a disk map (a
// root file system containerd's snapshotter committed, say), named by the
// snapshot.
func SnapshotBaseFile(ctx context.Context, g *snapshotter.Graph, snap, dir string) (string, error) {
	r, err := g.OpenMap(snap, string(snapshotter.KindDisk))
	if err != nil {
		return "", err
	}
	key, err := contentKey(r)
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, snap+"-"+key.Short()+".raw")
	if fi, err := os.Stat(path); err == nil {
		if !fi.Mode().IsRegular() || fi.Size() != r.Size() {
			return "", fmt.Errorf("base file %s is not the %d-byte image it should be; remove it: %w", path, r.Size(), errdefs.ErrDataLoss)
		}
		return path, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	f.Close()
	ok := false
	defer func() {
		if !ok {
			os.Remove(tmp)
		}
	}()
	if err := r.Export(ctx, tmp, nil); err != nil {
		return "", fmt.Errorf("exporting snapshot %s: %w", snap, err)
	}
	if err := syncFile(tmp, 0o444); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", err
	}
	ok = true
	if err := syncDir(dir); err != nil {
		return "", err
	}
	return path, nil
}

// contentKey hashes a disk's size and block map: equal keys, equal bytes.
func contentKey(r *snapshotter.MapReader) (cas.ID, error) {
	h := sha256.New()
	var buf [8 + sha256.Size]byte
	h.Write([]byte("boxd base file v1\x00"))
	h.Write(binary.LittleEndian.AppendUint64(nil, uint64(r.Size())))
	err := r.Each(func(n uint64, id cas.ID) error {
		binary.LittleEndian.PutUint64(buf[:8], n)
		copy(buf[8:], id[:])
		h.Write(buf[:])
		return nil
	})
	var key cas.ID
	h.Sum(key[:0])
	return key, err
}

// syncFile sets path's mode and flushes it to disk.
func syncFile(path string, mode fs.FileMode) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	err = errors.Join(f.Chmod(mode), f.Sync())
	return errors.Join(err, f.Close())
}

// syncDir flushes a folder's entries to disk, so a rename in it is durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}
