package remote

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// PushStats says what a push sent.
type PushStats struct {
	Snapshots   int           `json:"snapshots"`    // manifests written
	Packs       int           `json:"packs"`        // packs uploaded
	PackBytes   int64         `json:"pack_bytes"`   // their bytes
	ChunksFound int           `json:"chunks_found"` // chunks the bucket had already
	Took        time.Duration `json:"took"`
}

// Push puts snapshot name and the snapshots it stands on into the bucket,
// each that is not there yet: the packs holding the chunks the bucket
// lacks, their index segments, then the manifests, parents first. A push
// that fails or is killed leaves the bucket consistent; the next one
// completes it.
func (r *Remote) Push(ctx context.Context, name string) (PushStats, error) {
	began := time.Now()
	var st PushStats
	chain, err := r.unpushed(ctx, name)
	if err != nil {
		return st, err
	}
	if len(chain) == 0 {
		return st, nil
	}
	if err := r.refreshIndex(ctx); err != nil {
		return st, err
	}
	store := r.cfg.Graph.Store()
	packs := map[uint32]bool{}
	for _, m := range chain {
		ids, err := m.Chunks()
		if err != nil {
			return st, err
		}
		for _, id := range ids {
			if _, ok := r.lookup(id); ok {
				st.ChunksFound++
				continue
			}
			loc, err := store.Lookup(id)
			if err != nil {
				return st, fmt.Errorf("pushing snapshot %q: %w", m.Snapshot.Name, err)
			}
			packs[loc.Pack] = true
		}
	}
	for _, num := range slices.Sorted(maps.Keys(packs)) {
		n, err := r.uploadPack(ctx, num)
		if err != nil {
			return st, fmt.Errorf("pushing snapshot %q: %w", name, err)
		}
		st.Packs++
		st.PackBytes += n
	}
	for _, m := range chain {
		if err := r.putManifest(ctx, m); err != nil {
			return st, fmt.Errorf("pushing snapshot %q: %w", name, err)
		}
		st.Snapshots++
	}
	st.Took = time.Since(began)
	r.log.Info("remote: pushed", "snapshot", name, "manifests", st.Snapshots, "packs", st.Packs, "bytes", st.PackBytes, "took", st.Took)
	return st, nil
}

// unpushed returns the manifests of name and its ancestors that the
// bucket lacks, parents first. An ancestor of a pushed snapshot is pushed:
// manifests go parents first.
func (r *Remote) unpushed(ctx context.Context, name string) ([]snapshotter.Manifest, error) {
	return chain(name, func(n string) (bool, error) {
		_, err := r.cfg.Bucket.Stat(ctx, snapshotKey(n))
		if errors.Is(err, errdefs.ErrNotFound) {
			return false, nil
		}
		return err == nil, err
	}, r.cfg.Graph.Manifest)
}

// chain returns the manifests of name and its ancestors, parents first,
// down to the first that has says is there already.
func chain(name string, has func(string) (bool, error), manifest func(string) (snapshotter.Manifest, error)) ([]snapshotter.Manifest, error) {
	var out []snapshotter.Manifest
	for n := name; n != ""; {
		there, err := has(n)
		if err != nil {
			return nil, err
		}
		if there {
			break
		}
		m, err := manifest(n)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
		n = m.Snapshot.Parent
	}
	slices.Reverse(out)
	return out, nil
}

// uploadPack uploads local pack num, then its index segment; it returns
// the bytes uploaded (none when the bucket had it).
func (r *Remote) uploadPack(ctx context.Context, num uint32) (int64, error) {
	store := r.cfg.Graph.Store()
	info, err := store.Pack(num)
	if err != nil {
		return 0, err
	}
	f, entries, err := store.OpenPack(num)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, info.Size)); err != nil {
		return 0, fmt.Errorf("reading %s: %w", info.Name(), err)
	}
	name := hex.EncodeToString(h.Sum(nil))
	var sent int64
	// A push before this one may have sent it and been cut off before the
	// segment: the same name is the same bytes. Asked first, as a server
	// may refuse a create by closing the connection mid-body, which looks
	// like a failure.
	there := func() bool {
		n, err := r.cfg.Bucket.Stat(ctx, packKey(name))
		return err == nil && n == info.Size
	}
	if !there() {
		err = r.cfg.Bucket.Put(ctx, packKey(name), io.NewSectionReader(f, 0, info.Size), info.Size, true)
		switch {
		case err == nil:
			sent = info.Size
		case errors.Is(err, errdefs.ErrAlreadyExists) || there():
		default:
			return 0, err
		}
	}
	tail, err := cas.PackTail(f, entries, info.Size)
	if err != nil {
		return sent, err
	}
	seg := encodeSegment(info.Size, tail)
	if err := r.cfg.Bucket.Put(ctx, indexKey(name), bytes.NewReader(seg), int64(len(seg)), true); err != nil && !errors.Is(err, errdefs.ErrAlreadyExists) {
		return sent, err
	}
	r.addSegment(indexKey(name), entries)
	err = r.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketSegments).Put([]byte(indexKey(name)), seg); err != nil {
			return err
		}
		return tx.Bucket(bucketUploaded).Put(packNumKey(num), []byte(name))
	})
	return sent, err
}

func packNumKey(num uint32) []byte { return []byte(fmt.Sprintf("%08x", num)) }

// putManifest writes m, create-only: a manifest already there is the same
// snapshot (snapshots never change).
func (r *Remote) putManifest(ctx context.Context, m snapshotter.Manifest) error {
	m.Snapshot.Labels = r.hostless(m.Snapshot.Labels)
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	err = r.cfg.Bucket.Put(ctx, snapshotKey(m.Snapshot.Name), bytes.NewReader(b), int64(len(b)), true)
	if errors.Is(err, errdefs.ErrAlreadyExists) {
		return nil
	}
	return err
}

// hostless returns labels without DropLabels and with the root's path
// replaced by RootToken.
func (r *Remote) hostless(labels map[string]string) map[string]string {
	out := map[string]string{}
	root := strings.TrimSuffix(r.cfg.Root, "/") + "/"
	for k, v := range labels {
		if slices.Contains(r.cfg.DropLabels, k) {
			continue
		}
		out[k] = strings.ReplaceAll(v, root, RootToken+"/")
	}
	return out
}

// hosted is hostless undone on this host.
func (r *Remote) hosted(labels map[string]string) map[string]string {
	if labels == nil {
		return nil
	}
	out := map[string]string{}
	root := strings.TrimSuffix(r.cfg.Root, "/") + "/"
	for k, v := range labels {
		out[k] = strings.ReplaceAll(v, RootToken+"/", root)
	}
	return out
}

// Uploaded reports the local packs known to be in the bucket.
func (r *Remote) Uploaded() (map[uint32]bool, error) {
	out := map[uint32]bool{}
	err := r.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketUploaded).ForEach(func(k, _ []byte) error {
			var n uint32
			if _, err := fmt.Sscanf(string(k), "%08x", &n); err == nil {
				out[n] = true
			}
			return nil
		})
	})
	return out, err
}
