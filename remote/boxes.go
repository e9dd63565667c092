package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// BoxObject is a hibernated box as the bucket keeps it.
type BoxObject struct {
	Name string `json:"name"`
	// Snapshot is what the box resumes from; its manifest, and its
	// ancestors', are in the bucket before the box object names it.
	Snapshot string `json:"snapshot"`
	// Record is the box manager's record of the box, without host paths.
	Record json.RawMessage `json:"record"`
	// Host pushed it, at Pushed.
	Host   string    `json:"host"`
	Pushed time.Time `json:"pushed"`
}

// Lease says which host owns a box.
type Lease struct {
	Box   string    `json:"box"`
	Host  string    `json:"host"`
	Taken time.Time `json:"taken"`
}

// PutBox writes the box object of b.Name, replacing the last; the
// snapshot it names must have been pushed.
func (r *Remote) PutBox(ctx context.Context, b BoxObject) error {
	if _, err := r.cfg.Bucket.Stat(ctx, snapshotKey(b.Snapshot)); err != nil {
		return fmt.Errorf("box %s: snapshot %q is not in the bucket: %w", b.Name, b.Snapshot, err)
	}
	b.Host, b.Pushed = r.host, time.Now().UTC()
	data, err := json.Marshal(b)
	if err != nil {
		return err
	}
	return r.cfg.Bucket.Put(ctx, boxKey(b.Name), bytes.NewReader(data), int64(len(data)), false)
}

// GetBox reads the box object of name.
func (r *Remote) GetBox(ctx context.Context, name string) (BoxObject, error) {
	var b BoxObject
	data, err := r.cfg.Bucket.Get(ctx, boxKey(name))
	if err != nil {
		return b, fmt.Errorf("box %s: %w", name, err)
	}
	if err := json.Unmarshal(data, &b); err != nil || b.Name != name {
		return b, fmt.Errorf("box object %s unreadable: %w", boxKey(name), errdefs.ErrDataLoss)
	}
	return b, nil
}

// ErrLeased says another host owns the box.
var ErrLeased = fmt.Errorf("box is owned by another host: %w", errdefs.ErrFailedPrecondition)

// TakeLease makes this host the owner of box name, with a create-only
// write: of hosts taking it at once, one succeeds and the others get
// ErrLeased, naming the owner. Taking a lease this host holds succeeds;
// taken says whether this call took it (false: it was held already).
func (r *Remote) TakeLease(ctx context.Context, name string) (taken bool, err error) {
	for try := 1; ; try++ {
		l := Lease{Box: name, Host: r.host, Taken: time.Now().UTC()}
		data, err := json.Marshal(l)
		if err != nil {
			return false, err
		}
		err = r.cfg.Bucket.Put(ctx, leaseKey(name), bytes.NewReader(data), int64(len(data)), true)
		if !errors.Is(err, errdefs.ErrAlreadyExists) {
			return err == nil, err
		}
		held, err := r.LeaseOf(ctx, name)
		switch {
		case err == nil && held.Host == r.host:
			return false, nil
		case err == nil:
			return false, fmt.Errorf("box %s is owned by host %s since %s (hibernate it there first): %w", name, held.Host, held.Taken.Format(time.RFC3339), ErrLeased)
		case !errors.Is(err, errdefs.ErrNotFound):
			return false, err
		case try == leaseTries:
			return false, fmt.Errorf("box %s: its lease was refused %d times with no owner to be seen: %w", name, try, errdefs.ErrUnavailable)
		}
		// The create was refused for a write of another host in
		// progress (409), which then failed or is not visible yet: try
		// again.
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(time.Duration(try) * 20 * time.Millisecond):
		}
	}
}

// leaseTries bounds the takes of a lease that meet another host's write
// in progress.
const leaseTries = 10

// LeaseOf reads the lease of box name.
func (r *Remote) LeaseOf(ctx context.Context, name string) (Lease, error) {
	var l Lease
	data, err := r.cfg.Bucket.Get(ctx, leaseKey(name))
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal(data, &l); err != nil {
		return l, fmt.Errorf("lease %s unreadable: %w", leaseKey(name), errdefs.ErrDataLoss)
	}
	return l, nil
}

// ReleaseLease gives up this host's lease of box name; a lease another
// host holds, or none, is left as it is.
func (r *Remote) ReleaseLease(ctx context.Context, name string) error {
	l, err := r.LeaseOf(ctx, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if l.Host != r.host {
		return nil
	}
	return r.cfg.Bucket.Delete(ctx, leaseKey(name))
}

// BreakLease removes the lease of box name that host holds: for a host
// known to be gone (fenced), so that another host may resume the box from
// its last push. A lease another host holds is refused.
func (r *Remote) BreakLease(ctx context.Context, name, host string) error {
	l, err := r.LeaseOf(ctx, name)
	if err != nil {
		return fmt.Errorf("box %s: %w", name, err)
	}
	if l.Host != host {
		return fmt.Errorf("box %s is owned by host %s, not %s: %w", name, l.Host, host, errdefs.ErrFailedPrecondition)
	}
	return r.cfg.Bucket.Delete(ctx, leaseKey(name))
}

// SetPending records that box name's push failed, so that it is tried
// again; done clears it.
func (r *Remote) SetPending(name string, pending bool) error {
	return r.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPending)
		if !pending {
			return b.Delete([]byte(name))
		}
		return b.Put([]byte(name), []byte(time.Now().UTC().Format(time.RFC3339)))
	})
}

// Pending lists the boxes whose push is to be tried again.
func (r *Remote) Pending() ([]string, error) {
	var out []string
	err := r.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPending).ForEach(func(k, _ []byte) error {
			out = append(out, string(k))
			return nil
		})
	})
	return out, err
}

// Report is what the bucket holds, beside the local store.
type Report struct {
	URL         string   `json:"url,omitempty"`
	Host        string   `json:"host"`
	Packs       int      `json:"packs"`
	PackBytes   int64    `json:"pack_bytes"`
	Segments    int      `json:"index_segments"`
	Snapshots   int      `json:"snapshots"`
	Boxes       []string `json:"boxes,omitempty"`
	Leases      []Lease  `json:"leases,omitempty"`
	LocalPacks  int      `json:"local_packs"`
	LocalBytes  int64    `json:"local_pack_bytes"`
	Uploaded    int      `json:"local_packs_uploaded"`
	PendingPush []string `json:"pending_push,omitempty"`
}

// Report lists the bucket.
func (r *Remote) Report(ctx context.Context) (Report, error) {
	rep := Report{Host: r.host}
	if s, ok := r.cfg.Bucket.(interface{ String() string }); ok {
		rep.URL = s.String()
	}
	objs, err := r.cfg.Bucket.List(ctx, "")
	if err != nil {
		return rep, err
	}
	for _, o := range objs {
		switch {
		case strings.HasPrefix(o.Key, packsDir):
			rep.Packs++
			rep.PackBytes += o.Size
		case strings.HasPrefix(o.Key, indexDir):
			rep.Segments++
		case strings.HasPrefix(o.Key, snapshotsDir):
			rep.Snapshots++
		case strings.HasPrefix(o.Key, boxesDir):
			rep.Boxes = append(rep.Boxes, strings.TrimSuffix(strings.TrimPrefix(o.Key, boxesDir), ".json"))
		case strings.HasPrefix(o.Key, leasesDir):
			if l, err := r.LeaseOf(ctx, strings.TrimSuffix(strings.TrimPrefix(o.Key, leasesDir), ".json")); err == nil {
				rep.Leases = append(rep.Leases, l)
			}
		}
	}
	st, err := r.cfg.Graph.Store().Stats()
	if err != nil {
		return rep, err
	}
	rep.LocalPacks, rep.LocalBytes = st.Packs, st.PackBytes
	up, err := r.Uploaded()
	if err != nil {
		return rep, err
	}
	rep.Uploaded = len(up)
	rep.PendingPush, err = r.Pending()
	return rep, err
}
