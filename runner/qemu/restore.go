package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// Restore starts a machine from a QEMU snapshot. RestoreOptions.Disk is
// where to create the machine's disk, a qcow2 overlay over the snapshot's
// ("" puts it in the machine's folder, gone at exit); Console is as for
// Start.
//
// Memory is the snapshot's frozen memory file, mapped copy-on-write: the
// one SnapshotForFork or Freeze left (a spare waiting on it is taken), or
// one rebuilt from the store (only the pages that hold data are written; a
// missing or damaged chunk fails the restore before QEMU starts). With
// RestoreOptions.LongLived it is a memory file of the machine's own,
// mapped shared (see memfile.go).
func (r *Runner) Restore(ctx context.Context, snap string, opts runner.RestoreOptions) (runner.Machine, error) {
	m, err := r.RestoreMachine(ctx, snap, opts)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// RestoreMachine is Restore returning the concrete *Machine. It goes in
// phases: restoreMemory (the snapshot's frozen file, or a file of the
// machine's own filled while QEMU starts), restoreDisk (an overlay over the
// snapshot's disk), startMachine (a spare taken, else QEMU launched),
// loadState (memory filled, device state loaded) and, unless Paused, the
// guest continues.
func (r *Runner) RestoreMachine(ctx context.Context, snap string, opts runner.RestoreOptions) (*Machine, error) {
	if r.Graph == nil {
		return nil, errcat.NotSupported("qemu: restores need Runner.Graph")
	}
	s, devices, err := r.snapshotForRestore(snap)
	if err != nil {
		return nil, err
	}
	spec, err := r.machineSpec(s)
	if err != nil {
		return nil, err
	}
	spec.Console = opts.Console
	spec.HostPorts = opts.HostPorts
	if spec.Network == netSlirp {
		// Its device state is QEMU's user network's: it keeps it, with no
		// isolation and no host ports, until the box boots again.
		spec.HostPorts = nil
		r.logger().Warn("qemu: a snapshot from before boxes ran on passt restores on QEMU's own user network, which reaches the host's loopback, until its box boots again", "snapshot", snap)
	}
	rs := &restoreRun{r: r, ctx: ctx, snap: s, own: opts.LongLived, filled: make(chan error, 1), ph: startPhases()}
	if rs.own {
		rs.plan = r.lazyPlan(snap, devices)
	}
	if rs.plan != nil {
		// The page table is read while the machine is readied.
		rs.pages = make(chan lazyPagesResult, 1)
		go func() {
			pt, err := r.lazyPages(snap, spec.MemSize)
			rs.pages <- lazyPagesResult{pt, err}
		}()
	}
	if err := rs.restoreMemory(spec.MemSize); err != nil {
		return nil, err
	}
	if err := rs.restoreDisk(&spec, opts.Disk); err != nil {
		rs.undo()
		return nil, err
	}
	m, err := rs.startMachine(spec)
	if err != nil {
		rs.undo()
		return nil, err
	}
	if err := rs.loadState(m, devices); err != nil {
		_ = m.Stop(context.WithoutCancel(ctx)) // its exit removes what it holds
		return nil, err
	}
	m.last = snap
	m.pendingUnique = opts.Unique
	if l := m.lazy.Load(); l != nil {
		defer func() {
			if !m.stopped() {
				l.guestRuns()
			}
		}()
	}
	defer func() { r.logger().Debug("qemu: restore", rs.ph.log("id", m.id, "snapshot", snap)...) }()
	// A lazily restored machine is ready to adopt once its memory is in
	// place (watchLazy): a boxd that ends before that leaves it to be
	// stopped by the next, its snapshot intact.
	lazy := m.lazy.Load() != nil
	// A fork's children (made unique) start a layer over their parent,
	// which streams its chain first (flatten.go).
	if opts.Unique {
		defer m.flattenLater(1)
	} else {
		defer m.flattenLater(0)
	}
	if opts.Paused {
		if !lazy {
			m.markReady()
		}
		return m, nil
	}
	if err := m.Continue(ctx); err != nil {
		_ = m.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	rs.ph.mark("cont")
	if !lazy {
		m.markReady()
	}
	return m, nil
}

// restoreRun is one restore on its way through RestoreMachine's phases.
type restoreRun struct {
	r       *Runner
	ctx     context.Context
	snap    snapshotter.Snapshot
	own     bool                 // a memory file of the machine's own (LongLived)
	memFile string               // the machine's memory file
	filled  chan error           // the own file's filling, done (nil at once for a frozen file)
	plan    *postcopyPlan        // the device state taken apart for a lazy restore; nil restores eagerly
	pages   chan lazyPagesResult // a lazy restore's page table, being read
	ownDisk string               // a disk the runner made for the machine, gone with it
	ph      *phases
}

// lazyPagesResult is what Runner.lazyPages returned.
type lazyPagesResult struct {
	pt  lazyPageTable
	err error
}

// restoreMemory gets the machine's memory file: a file of its own, filled
// in the background while QEMU starts, or the snapshot's frozen file, one
// more machine mapping it.
func (rs *restoreRun) restoreMemory(size int64) error {
	var err error
	switch {
	case rs.plan != nil:
		// Served while the guest runs.
		var f *os.File
		if rs.memFile, f, err = rs.r.emptyMemory(rs.snap.Name, size); err == nil {
			_ = f.Close()
			rs.filled <- nil
		}
	case rs.own:
		var fill func(context.Context) error
		if rs.memFile, fill, err = rs.r.ownMemory(rs.snap.Name, size); err == nil {
			go func() { rs.filled <- fill(rs.ctx) }()
		}
	default:
		rs.memFile, err = rs.r.acquire(rs.ctx, rs.snap.Name)
		rs.filled <- nil
	}
	if err != nil {
		return err
	}
	rs.ph.mark("memory")
	return nil
}

// undo gives back what a restore that failed before its machine started
// took: the memory file and a disk the runner made.
func (rs *restoreRun) undo() {
	if rs.own {
		if err := <-rs.filled; err != nil { // moot: the restore failed anyway
			rs.r.logger().Debug("qemu: filling the memory of a failed restore", "snapshot", rs.snap.Name, "err", err)
		}
		_ = os.Remove(rs.memFile)
	} else {
		rs.r.release(rs.memFile)
	}
	if rs.ownDisk != "" {
		_ = os.Remove(rs.ownDisk)
	}
}

// restoreDisk makes the machine's disk, an overlay at disk ("" for one in
// the runner's folder) over the snapshot's, when the snapshot has one.
func (rs *restoreRun) restoreDisk(spec *runner.Spec, disk string) error {
	if _, ok := rs.snap.Map(DiskMap); ok || rs.snap.Labels[LabelDisk] != "" {
		if disk == "" {
			disk = filepath.Join(rs.r.diskDir(), fmt.Sprintf("restore-%d-%d.qcow2", os.Getpid(), rs.r.ids.Add(1)))
			rs.ownDisk = disk
		}
		if err := rs.r.overlayFor(rs.ctx, rs.snap, disk); err != nil {
			return err
		}
		spec.Disk = &runner.Disk{Path: disk}
	}
	rs.ph.mark("disk")
	return nil
}

// startMachine takes a spare waiting on the frozen file, or starts QEMU
// paused, waiting for the device state.
func (rs *restoreRun) startMachine(spec runner.Spec) (*Machine, error) {
	r := rs.r
	if rs.plan != nil {
		if m := r.takeResumeSpare(rs.ctx, spec); m != nil {
			_ = os.Remove(rs.memFile) // the spare has its own
			rs.memFile = m.memFile
			rs.ph.mark("spare")
			return m, nil
		}
	}
	if rs.own {
		m, err := r.launch(rs.ctx, spec, launchOptions{ownFile: rs.memFile, incoming: true, postcopy: rs.plan != nil})
		rs.ph.mark("launch")
		return m, err
	}
	m, err := r.takeSpare(rs.ctx, rs.memFile, spec)
	rs.ph.mark("spare")
	if m == nil && err == nil {
		m, err = r.launch(rs.ctx, spec, launchOptions{memFile: rs.memFile, incoming: true, acquired: true})
		rs.ph.mark("launch")
	}
	return m, err
}

// loadState waits for the own file's filling, then loads the device
// state; an own file's page sums are seeded meanwhile (QEMU does not touch
// the memory of a shared file, x-ignore-shared, until the guest runs).
func (rs *restoreRun) loadState(m *Machine, devices []byte) error {
	if rs.ownDisk != "" {
		m.ownDisk.Store(&rs.ownDisk) // from here it goes with the machine
	}
	if err := <-rs.filled; err != nil {
		return err
	}
	rs.ph.mark("filled")
	if rs.plan != nil {
		pr := <-rs.pages
		if pr.err != nil {
			return pr.err
		}
		l := rs.r.lazyMemoryOf(m, rs.snap.Name, rs.plan, pr.pt)
		if err := m.restoreLazily(rs.ctx, l, rs.ph); err != nil {
			return err
		}
		rs.ph.mark("devices")
		return nil
	}
	seeded := make(chan error, 1)
	if rs.own {
		go func() { seeded <- m.seedSums() }()
	} else {
		seeded <- nil
	}
	err := m.loadDevices(rs.ctx, devices)
	if serr := <-seeded; err == nil {
		err = serr
	}
	if err != nil {
		return err
	}
	rs.ph.mark("devices")
	return nil
}

// snapshotForRestore returns snapshot snap and its device state: from
// the store, or from a freeze whose snapshot is still being written.
func (r *Runner) snapshotForRestore(snap string) (snapshotter.Snapshot, []byte, error) {
	if p := r.pendingOf(snap); p != nil {
		return snapshotter.Snapshot{Name: snap, Parent: p.job.parent, Labels: p.job.labels}, p.job.devices, nil
	}
	s, err := r.Graph.Get(snap)
	if err != nil {
		return s, nil, err
	}
	devices, err := memstore.ReadBlob(r.Graph, snap, DevicesMap)
	if err != nil {
		return s, nil, fmt.Errorf("qemu: snapshot %q: device state: %w", snap, err)
	}
	return s, devices, nil
}

func (r *Runner) diskDir() string {
	d := filepath.Join(r.Dir, "disks")
	if r.Dir == "" {
		d = filepath.Join(os.TempDir(), "boxd-qemu-disks")
	}
	return d
}

// exportedDisk is where a restore exports the disk of snapshot snap when
// the overlay it froze is gone.
func (r *Runner) exportedDisk(snap string) string {
	return filepath.Join(r.diskDir(), "snap-"+snap+".raw")
}

// overlayFor creates disk, a qcow2 overlay holding the disk of snapshot s:
// over the frozen overlay the snapshot was taken from when it is still
// there, else over the disk exported from the store.
func (r *Runner) overlayFor(ctx context.Context, s snapshotter.Snapshot, disk string) error {
	if err := os.MkdirAll(filepath.Dir(disk), 0o700); err != nil {
		return fmt.Errorf("qemu: disk folder: %w", err)
	}
	backing := s.Labels[LabelDisk]
	if backing == "" || !exists(backing) {
		backing = r.exportedDisk(s.Name)
		if !exists(backing) {
			mr, err := r.Graph.OpenMap(s.Name, DiskMap)
			if err != nil {
				return err
			}
			if err := os.MkdirAll(filepath.Dir(backing), 0o700); err != nil {
				return fmt.Errorf("qemu: disk folder: %w", err)
			}
			if err := mr.Export(ctx, backing, nil); err != nil {
				return fmt.Errorf("qemu: disk of snapshot %q: %w", s.Name, err)
			}
			_ = os.Chmod(backing, 0o444)
		}
	}
	return CreateOverlay(ctx, disk, backing)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// acquire returns the frozen memory file of snap, rebuilding it from the
// store when there is none, and counts one more machine mapping it.
func (r *Runner) acquire(ctx context.Context, snap string) (string, error) {
	for {
		r.frozenMu.Lock()
		if f := r.frozen[snap]; f != nil {
			f.refs++
			r.frozenMu.Unlock()
			return f.path, nil
		}
		b := r.building[snap]
		if b == nil {
			break // with frozenMu held: this restore builds it
		}
		r.frozenMu.Unlock()
		// One restore builds a snapshot's file; the others wait for it
		// and map the same file, however many start at once.
		select {
		case <-b.done:
		case <-ctx.Done():
			return "", fmt.Errorf("qemu: memory of snapshot %q: %w", snap, ctx.Err())
		}
		if b.err != nil {
			return "", b.err
		}
	}
	b := &build{done: make(chan struct{})}
	if r.building == nil {
		r.building = map[string]*build{}
	}
	r.building[snap] = b
	r.frozenMu.Unlock()
	path, err := r.buildFrozen(ctx, snap)
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	delete(r.building, snap)
	b.err = err
	close(b.done)
	if err != nil {
		return "", err
	}
	r.register(&frozenFile{snap: snap, path: path, refs: 1})
	return path, nil
}

// build is one snapshot's frozen file being rebuilt from the store; err is
// set before done closes.
type build struct {
	done chan struct{}
	err  error
}

// buildFrozen rebuilds snapshot snap's memory file from the store, holes
// where pages are zero.
func (r *Runner) buildFrozen(ctx context.Context, snap string) (string, error) {
	r.builds.Add(1)
	mr, err := r.Graph.OpenMap(snap, memstore.DefaultMap)
	if err != nil {
		return "", fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
	}
	if err := os.MkdirAll(r.memDir(), 0o700); err != nil {
		return "", fmt.Errorf("qemu: memory folder: %w", err)
	}
	path := filepath.Join(r.memDir(), fmt.Sprintf("frozen-%d-%d-%s.mem", os.Getpid(), r.ids.Add(1), snap))
	if err := mr.Export(ctx, path, nil); err != nil {
		return "", fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
	}
	return path, nil
}

// adopt makes path, a stopped machine's memory file, the frozen memory of
// snap.
func (r *Runner) adopt(snap, path string) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	r.register(&frozenFile{snap: snap, path: path})
}

func (r *Runner) register(f *frozenFile) {
	if r.frozen == nil {
		r.frozen, r.byPath = map[string]*frozenFile{}, map[string]*frozenFile{}
	}
	r.frozen[f.snap], r.byPath[f.path] = f, f
}

// release counts one machine fewer mapping the frozen file at path and
// removes the file when none is left and its snapshot is in the store.
func (r *Runner) release(path string) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	f := r.byPath[path]
	if f == nil {
		return
	}
	if f.refs--; f.refs <= 0 {
		f.done = true
		r.maybeDrop(f)
	}
}

// maybeDrop removes f if nothing needs it any more: no machine maps it, no
// restore is to come unasked, and its snapshot is in the store.
func (r *Runner) maybeDrop(f *frozenFile) {
	if f.refs > 0 || !f.done || f.pending != nil {
		return
	}
	delete(r.frozen, f.snap)
	delete(r.byPath, f.path)
	_ = os.Remove(f.path)
	r.stopSpares(f.path)
}

// reacquire counts one more machine mapping the frozen file at path, if it
// is still there.
func (r *Runner) reacquire(path string) bool {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	f := r.byPath[path]
	if f == nil {
		return false
	}
	f.refs++
	return true
}

// dropFrozen removes the frozen memory file of snap once no machine maps it
// and the snapshot is in the store (a snapshot whose write failed keeps its
// file for the next try).
func (r *Runner) dropFrozen(snap string) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	if f := r.frozen[snap]; f != nil {
		f.done = true
		r.maybeDrop(f)
	}
}

// FrozenFiles lists the frozen memory files the runner holds.
func (r *Runner) FrozenFiles() []string {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	var out []string
	for p := range r.byPath {
		out = append(out, p)
	}
	return out
}

// errNoUnique says a unique restore has no way to reseed the guest.
var errNoUnique = errors.New("qemu: a unique restore needs Runner.Unique (the guest agent reseeds the guest)")

// lazyPlan returns the device state of snapshot snap taken apart for a
// lazy restore, or nil where the restore must be eager: EagerRestore, the
// snapshot's frozen file still in memory (copying it is quicker than
// serving it), a snapshot still on its way to the store, or device state
// this code does not understand (logged).
func (r *Runner) lazyPlan(snap string, devices []byte) *postcopyPlan {
	if r.EagerRestore || r.pendingOf(snap) != nil {
		return nil
	}
	r.frozenMu.Lock()
	_, frozen := r.frozen[snap]
	r.frozenMu.Unlock()
	if frozen {
		return nil
	}
	p, err := planPostcopy(devices)
	if err != nil {
		r.logger().Warn("qemu: restoring eagerly", "snapshot", snap, "err", err)
		return nil
	}
	return p
}
