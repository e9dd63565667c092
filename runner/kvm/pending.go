package kvm

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// pendingSnap is a fork's snapshot on its way to the store.
//
// Its life: SnapshotForFork copies the pages the machine dirtied since its
// previous snapshot into an overlay (host memory) and registers it here
// (pending); Restore serves children from the overlay over the nearest
// snapshot in the store at once, while a goroutine writes the snapshot into
// the store (its parent first, if that is pending too). Once written it
// leaves the list and drops its reference to the overlay (committed); the
// overlay's memory goes when the last child serving from it stops. If the
// write fails the snapshot stays pending, and the next one who needs it in
// the store (a snapshot on top of it, Committed, Flush) writes it again. If
// boxd dies first, the snapshot is lost, and only it: the store commits a
// snapshot whole or not at all, after its parent.
type pendingSnap struct {
	name, parent string
	size         int64
	overlay      *memstore.Overlay
	blob         []byte // the machine state
	labels       map[string]string

	done      chan struct{} // closed when the first write ends
	err       error         // its outcome (pendMu), nil once written
	retryMu   sync.Mutex    // one write again at a time
	hurry     chan struct{} // closed when someone waits for the write
	hurryOnce sync.Once
}

// Writes wait for the restores of a fork to be done: they are what the
// fork's caller waits for, and on a small host the write (hashing,
// compressing, syncing) would take their CPU.
const (
	writeDelay    = 20 * time.Millisecond // no restore for this long
	maxWriteDelay = time.Second
)

// waitQuiet holds p's first write until no restore has run for
// writeDelay, someone waits for the write, or maxWriteDelay has passed.
func (r *Runner) waitQuiet(p *pendingSnap) {
	deadline := time.Now().Add(maxWriteDelay)
	t := time.NewTimer(writeDelay)
	defer t.Stop()
	for {
		select {
		case <-p.hurry:
			return
		case <-t.C:
		}
		idle := monotonic() - time.Duration(r.lastRestore.Load())
		if (r.restoring.Load() == 0 && idle >= writeDelay) || time.Now().After(deadline) {
			return
		}
		t.Reset(writeDelay)
	}
}

// hurryUp starts p's first write now.
func (p *pendingSnap) hurryUp() { p.hurryOnce.Do(func() { close(p.hurry) }) }

// The kvm runner's fork writes its snapshots in the background.
var (
	_ runner.Forker           = (*Machine)(nil)
	_ runner.BackgroundWriter = (*Runner)(nil)
)

// SnapshotForFork implements runner.Forker: an incremental snapshot whose
// dirty pages are copied to host memory, so that the machine continues and
// Restores of the snapshot start as soon as it returns; the snapshot
// reaches the store in the background (Flush, Committed). A machine with
// no previous snapshot, or a snapshot that is not incremental, is taken
// with Snapshot.
func (m *Machine) SnapshotForFork(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	m.mu.Lock()
	parent := m.last
	m.mu.Unlock()
	if !opts.Incremental || parent == "" {
		return m.Snapshot(ctx, name, opts)
	}
	if err := m.r.checkFree(name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	held, err := m.hold(ctx)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	pages := memstore.Bitmap(held.dirty).Pages(int(m.params.MemSize / memstore.PageSize))
	base := m.r.overlayOf(parent)
	ov, err := memstore.NewOverlay(pages, base)
	if base != nil {
		base.Release() // NewOverlay holds its own reference
	}
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	if err := m.memory().readPages(pages, ov.Data()); err != nil {
		ov.Release()
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	m.r.tell(stepCaptured)
	labels := map[string]string{runner.LabelRunner: m.r.Name()}
	maps.Copy(labels, opts.Labels)
	p := &pendingSnap{name: name, parent: parent, size: m.params.MemSize, overlay: ov, blob: held.blob, labels: labels, done: make(chan struct{}), hurry: make(chan struct{})}
	m.r.adoptPending(p)
	m.mu.Lock()
	m.last = name
	m.mu.Unlock()
	if held.wasRunning {
		if err := m.Continue(ctx); err != nil {
			return snapshotter.Snapshot{Name: name, Parent: parent, Labels: labels}, err
		}
	}
	return snapshotter.Snapshot{Name: name, Parent: parent, Labels: labels}, nil
}

// StartSpares implements runner.Forker: n more VMM processes wait in the
// pool for the next Restores.
func (m *Machine) StartSpares(ctx context.Context, n int) error {
	for range n {
		s, err := m.r.startSpare()
		if err != nil {
			return err
		}
		m.r.poolMu.Lock()
		closed := m.r.closed
		if !closed {
			m.r.pool = append(m.r.pool, s)
		}
		m.r.poolMu.Unlock()
		if closed {
			_ = s.Stop(ctx)
			return nil
		}
	}
	return nil
}

// checkFree refuses a name taken by a snapshot in the store or on its way.
func (r *Runner) checkFree(name string) error {
	if err := snapshotter.ValidateName(name); err != nil {
		return err
	}
	if _, err := r.Graph.Get(name); err == nil || r.pendingOf(name) != nil {
		return fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
	}
	return nil
}

// adoptPending lists p and writes it to the store in the background.
func (r *Runner) adoptPending(p *pendingSnap) {
	r.pendMu.Lock()
	if r.pending == nil {
		r.pending = map[string]*pendingSnap{}
	}
	r.pending[p.name] = p
	r.pendMu.Unlock()
	r.writers.Go(func() {
		r.waitQuiet(p)
		_ = r.write(context.Background(), p)
		close(p.done)
	})
}

// write captures p into the store, its parent first, and records the
// outcome.
func (r *Runner) write(ctx context.Context, p *pendingSnap) error {
	err := r.committed(ctx, p.parent)
	if err == nil && r.beforeCommit != nil {
		err = r.beforeCommit(p.name)
	}
	if err == nil {
		size := p.size
		_, err = memstore.Capture(ctx, r.Graph, p.overlay, size, memstore.CaptureOptions{
			Name: p.name, Parent: p.parent, Labels: p.labels,
			Dirty: p.overlay.Bitmap(int(size / memstore.PageSize)),
			Blobs: map[string][]byte{StateMap: p.blob},
		})
	}
	r.pendMu.Lock()
	p.err = err
	if err == nil && r.pending[p.name] == p {
		delete(r.pending, p.name)
	}
	r.pendMu.Unlock()
	if err == nil {
		// The next fork's children restore over this snapshot: make its
		// page table from its parent's, if kept, while nobody waits.
		_ = r.pageTables().Derive(r.Graph, p.parent, p.name, memstore.DefaultMap, p.overlay.Pages())
		p.overlay.Release()
	}
	return err
}

func (r *Runner) pendingOf(name string) *pendingSnap {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	return r.pending[name]
}

// overlayOf returns a reference to the overlay of pending snapshot name,
// or nil when name is in the store.
func (r *Runner) overlayOf(name string) *memstore.Overlay {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	if p := r.pending[name]; p != nil {
		p.overlay.Retain()
		return p.overlay
	}
	return nil
}

// inStore returns the nearest of snap and its ancestors that is in the
// store.
func (r *Runner) inStore(snap string) string {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	for {
		p := r.pending[snap]
		if p == nil {
			return snap
		}
		snap = p.parent
	}
}

// committed waits until snapshot name, if it is on its way to the store,
// is written; if its write failed, it writes it once more.
func (r *Runner) committed(ctx context.Context, name string) error {
	p := r.pendingOf(name)
	if p == nil {
		return nil
	}
	p.hurryUp()
	select {
	case <-p.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	p.retryMu.Lock()
	defer p.retryMu.Unlock()
	if r.pendingOf(name) != p {
		return nil // written meanwhile
	}
	if err := r.write(ctx, p); err != nil {
		return fmt.Errorf("kvm: snapshot %q is not in the store: %w", name, err)
	}
	return nil
}

// Committed waits until snapshot name is in the store, writing it again if
// its background write failed, and returns it.
func (r *Runner) Committed(ctx context.Context, name string) (snapshotter.Snapshot, error) {
	if err := r.committed(ctx, name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	return r.Graph.Get(name)
}

// Flush implements runner.BackgroundWriter.
func (r *Runner) Flush(ctx context.Context) error {
	var errs []error
	for _, n := range r.pendingNames() {
		errs = append(errs, r.committed(ctx, n))
	}
	return errors.Join(errs...)
}

// Pending implements runner.BackgroundWriter.
func (r *Runner) Pending() []string {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	var out []string
	for name, p := range r.pending {
		out = append(out, name, p.parent)
	}
	return out
}

func (r *Runner) pendingNames() []string {
	r.pendMu.Lock()
	defer r.pendMu.Unlock()
	return slices.Sorted(maps.Keys(r.pending))
}

// stateBlob returns the machine state of snapshot snap, from memory while
// it is on its way to the store.
func (r *Runner) stateBlob(snap string) ([]byte, error) {
	if p := r.pendingOf(snap); p != nil {
		return p.blob, nil
	}
	return memstore.ReadBlob(r.Graph, snap, StateMap)
}
