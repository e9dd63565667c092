package qemu

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
)

// pendingSnap is a snapshot on its way to the store. SnapshotForFork (and Freeze of a
// machine on its own memory file) return once QEMU's device state is saved,
// the disk frozen and the snapshot's frozen memory file filled; that file
// and the frozen disk overlay no longer change, so forks run from them at
// once while the snapshot is written. Until it is, the file stays; if
// writing fails, the snapshot stays pending and the next snapshot that
// needs it (or Committed, or Flush) tries again.
type pendingSnap struct {
	job     *captureJob
	done    chan struct{} // closed when the first attempt ends
	err     error         // its error (frozenMu), nil once written
	needed  chan struct{} // closed when something waits for the write: it starts at once
	needOne sync.Once
}

// maxWriteHold bounds how long SnapshotOptions.WriteAfter holds a write back (a variable for tests).
var maxWriteHold = 10 * time.Second

// need starts p's first write now if it is held back.
func (p *pendingSnap) need() { p.needOne.Do(func() { close(p.needed) }) }

// hold waits until p's first write may start: once the job's WriteAfter is closed, something needs the
// snapshot, or maxWriteHold has passed.
func (p *pendingSnap) hold() {
	if p.job.writeAfter == nil {
		return
	}
	t := time.NewTimer(maxWriteHold)
	defer t.Stop()
	select {
	case <-p.job.writeAfter:
	case <-p.needed:
	case <-t.C:
	}
}

// adoptPending makes j's memory file the frozen memory of snapshot j.name
// and writes the snapshot in the background.
func (r *Runner) adoptPending(j *captureJob) {
	p := &pendingSnap{job: j, done: make(chan struct{}), needed: make(chan struct{})}
	r.frozenMu.Lock()
	if r.pending == nil {
		r.pending = map[string]*pendingSnap{}
	}
	r.pending[j.name] = p
	r.register(&frozenFile{snap: j.name, path: j.memFile, pending: p})
	delete(r.prepFiles, j.memFile) // a fork's prepared file: frozen now
	r.frozenMu.Unlock()
	go func() {
		p.hold()
		ph := startPhases()
		_, err := r.write(context.Background(), p)
		ph.mark("capture")
		r.logger().Debug("qemu: frozen snapshot written", ph.log("name", j.name, "err", err)...)
		if err != nil {
			r.logger().Error("qemu: writing a frozen snapshot to the store; the next snapshot that needs it tries again", "snapshot", j.name, "err", err)
		}
		close(p.done)
	}()
}

// write captures p's job into the store (its parent first, if that is
// pending too) and records the outcome.
func (r *Runner) write(ctx context.Context, p *pendingSnap) (snapshotter.Snapshot, error) {
	if err := r.committed(ctx, p.job.parent); err != nil {
		r.setPendingErr(p, err)
		return snapshotter.Snapshot{}, err
	}
	s, err := r.capture(ctx, p.job)
	r.setPendingErr(p, err)
	return s, err
}

func (r *Runner) setPendingErr(p *pendingSnap, err error) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	p.err = err
	if err != nil {
		return
	}
	if r.pending[p.job.name] == p {
		delete(r.pending, p.job.name)
	}
	if f := r.frozen[p.job.name]; f != nil && f.pending == p {
		f.pending = nil
		r.maybeDrop(f)
	}
}

// isPending says whether snapshot name is on its way to the store.
func (r *Runner) isPending(name string) bool {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	return r.pending[name] != nil
}

func (r *Runner) pendingOf(name string) *pendingSnap {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	return r.pending[name]
}

// committed waits until snapshot name, if a freeze left it on its way to
// the store, is written. If writing it failed (a full disk), it tries
// once more, and fails if that fails.
func (r *Runner) committed(ctx context.Context, name string) error {
	p := r.pendingOf(name)
	if p == nil {
		return nil
	}
	p.need()
	select {
	case <-p.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	r.frozenMu.Lock()
	err := p.err
	r.frozenMu.Unlock()
	if err == nil {
		return nil
	}
	p.job.retryMu.Lock()
	defer p.job.retryMu.Unlock()
	if r.pendingOf(name) != p {
		return nil // written meanwhile (a pending snapshot goes from the list only once written)
	}
	if _, err := r.write(ctx, p); err != nil {
		return fmt.Errorf("qemu: snapshot %q is not in the store: %w", name, err)
	}
	return nil
}

// Committed waits until snapshot name is in the store, writing it again
// if a freeze's background write failed, and returns it.
func (r *Runner) Committed(ctx context.Context, name string) (snapshotter.Snapshot, error) {
	if err := r.committed(ctx, name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	return r.Graph.Get(name)
}

// Flush waits until every snapshot frozen machines left is in the store.
func (r *Runner) Flush(ctx context.Context) error {
	r.frozenMu.Lock()
	var names []string
	for n := range r.pending {
		names = append(names, n)
	}
	r.frozenMu.Unlock()
	var errs []error
	for _, n := range names {
		errs = append(errs, r.committed(ctx, n))
	}
	return errors.Join(errs...)
}

// Pending lists the snapshots on their way to the store and the parents
// they are deltas against: what must stay in the store until they are
// written.
func (r *Runner) Pending() []string {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	var out []string
	for name, p := range r.pending {
		out = append(out, name, p.job.parent)
	}
	return out
}
