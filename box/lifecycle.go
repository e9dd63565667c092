package box

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Pause stops box name's vCPUs; its memory stays where it is.
func (m *Manager) Pause(ctx context.Context, name string) (Box, error) {
	return m.setPaused(ctx, name, true)
}

// Unpause lets a paused box run on.
func (m *Manager) Unpause(ctx context.Context, name string) (Box, error) {
	return m.setPaused(ctx, name, false)
}

func (m *Manager) setPaused(ctx context.Context, name string, pause bool) (Box, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	was := bx.State
	if bx, err = m.setPausedLocked(ctx, bx, pause); err != nil || bx.State == was {
		return bx, err
	}
	ev := events.Event{Type: events.Unpaused, Box: name, Reason: events.ReasonRequested}
	if pause {
		ev.Type = events.Paused
	} else {
		m.setClock(ctx, name) // it stood still while the box was paused
	}
	m.emit(ev)
	return bx, nil
}

func (m *Manager) setPausedLocked(ctx context.Context, bx Box, pause bool) (Box, error) {
	mach, err := m.running(bx)
	if err != nil {
		return bx, err
	}
	if pause {
		err, bx.State = mach.Pause(ctx), StatePaused
	} else {
		err, bx.State = mach.Continue(ctx), StateRunning
	}
	if err != nil {
		return bx, err
	}
	return bx, m.put(bx)
}

// running returns bx's machine, or an error saying why there is none.
func (m *Manager) running(bx Box) (runner.Machine, error) {
	mach, _, ok := m.machine(bx.Name)
	if (bx.State != StateRunning && bx.State != StatePaused) || !ok {
		return nil, fmt.Errorf("box %s is %s: %w", bx.Name, bx.State, ErrInvalidState)
	}
	return mach, nil
}

// Snapshot saves running box name as snapshot box.NAME.SNAP (SNAP chosen
// when empty), a delta against its previous one; the box goes on.
func (m *Manager) Snapshot(ctx context.Context, name, snap string) (snapshotter.Snapshot, error) {
	began := time.Now()
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	mach, err := m.running(bx)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	full := snapName(&bx, "snapshot")
	if snap != "" {
		full = "box." + bx.Name + "." + snap
		if err := snapshotter.ValidateName(full); err != nil {
			return snapshotter.Snapshot{}, err
		}
	}
	s, err := mach.Snapshot(ctx, full, runner.SnapshotOptions{Incremental: true, Labels: map[string]string{LabelBox: bx.Name}})
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	bx.Snapshot, bx.Disk = full, currentDisk(mach, bx.Disk)
	if err := m.put(bx); err != nil {
		return s, err
	}
	m.setClock(ctx, bx.Name)
	m.emit(events.Event{Type: events.Snapshot, Box: name, Snapshot: full, Took: time.Since(began)})
	return s, nil
}

// Hibernate snapshots running box name into the store and stops its
// machine, freeing its memory. If the snapshot fails (a full disk), the box
// keeps running.
func (m *Manager) Hibernate(ctx context.Context, name string) (Box, error) {
	return m.hibernate(ctx, name, events.ReasonRequested)
}

// hibernate is Hibernate; its event gives why.
func (m *Manager) hibernate(ctx context.Context, name, why string) (Box, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	return m.hibernateLocked(ctx, bx, why)
}

// hibernateLocked is hibernate of bx with its lock held.
func (m *Manager) hibernateLocked(ctx context.Context, bx Box, why string) (Box, error) {
	began := time.Now()
	bx, err := m.hibernateAs(ctx, bx, "hibernate")
	if err == nil {
		m.emit(events.Event{Type: events.Hibernated, Box: bx.Name, Snapshot: bx.Snapshot, Reason: why, Took: time.Since(began)})
		m.warmResume(bx)
	}
	return bx, err
}

// hibernateAs is hibernateLocked into a snapshot named for what.
func (m *Manager) hibernateAs(ctx context.Context, bx Box, what string) (Box, error) {
	mach, err := m.running(bx)
	if err != nil {
		return Box{}, err
	}
	snap := snapName(&bx, what)
	// Paused first, the machine stays paused after its snapshot until it stops: a guest that ran on would
	// send its agent link bytes the snapshot does not hold, and the link could not resume.
	if err := mach.Pause(ctx); err != nil {
		return bx, fmt.Errorf("hibernating box %s: %w", bx.Name, err)
	}
	s, err := mach.Snapshot(ctx, snap, runner.SnapshotOptions{Incremental: true, Labels: map[string]string{LabelBox: bx.Name}})
	if err != nil {
		if cerr := mach.Continue(context.WithoutCancel(ctx)); cerr != nil {
			m.log.Error("box: the machine stays paused after a failed hibernation", "box", bx.Name, "err", cerr)
		}
		return bx, fmt.Errorf("hibernating box %s (it keeps running): %w", bx.Name, err)
	}
	top := currentDisk(mach, bx.Disk)
	m.holdClient(bx.Name)
	m.stopMachine(ctx, bx.Name)
	bx.State, bx.Snapshot = StateHibernated, snap
	if frozen := m.snapshotDisk(s); frozen != "" && frozen != top {
		// The snapshot froze the disk into a layer of its own: the top
		// holds only what the machine wrote since, nothing the box needs
		// (the resume makes a new top over the snapshot's).
		_ = os.Remove(top)
		bx.Disk = frozen
	} else {
		bx.Disk = top
	}
	return bx, m.put(bx)
}

// Resume brings hibernated box name back from its snapshot.
func (m *Manager) Resume(ctx context.Context, name string) (Box, error) {
	began := time.Now()
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	if bx.State != StateHibernated {
		return bx, fmt.Errorf("box %s is %s, not hibernated: %w", name, bx.State, ErrInvalidState)
	}
	snap := bx.Snapshot
	if bx, err = m.resume(ctx, bx); err != nil {
		return bx, err
	}
	m.emit(events.Event{Type: events.Resumed, Box: name, Snapshot: snap, Reason: events.ReasonRequested, Took: time.Since(began)})
	return bx, nil
}

// resume restores bx from its snapshot onto a fresh disk overlay.
func (m *Manager) resume(ctx context.Context, bx Box) (Box, error) {
	if err := m.admit("resuming box "+bx.Name, bootNeed(bx.Memory)); err != nil {
		return bx, err
	}
	unique, err := agent.NewUnique("")
	if err != nil {
		return bx, err
	}
	unique.MachineID = "" // the same box: only entropy and the clock are new
	disk := m.newDiskPath(bx.Name)
	if err := m.restoreWith(ctx, bx, bx.Snapshot, disk, unique, true); err != nil {
		return bx, fmt.Errorf("resuming box %s: %w", bx.Name, err)
	}
	bx.State, bx.Disk, bx.Note = StateRunning, disk, ""
	return bx, m.put(bx)
}

// restore starts bx's machine from snap on a new disk at disk, waits for
// its agent and gives the guest u.
func (m *Manager) restore(ctx context.Context, bx Box, snap, disk string, u agent.Unique) error {
	return m.restoreWith(ctx, bx, snap, disk, u, false)
}

// restoreWith is restore; longLived says the machine is bx resumed (not a
// fork, which may share the snapshot's memory with its siblings): it gets
// spares for forks.
func (m *Manager) restoreWith(ctx context.Context, bx Box, snap, disk string, u agent.Unique, longLived bool) error {
	r, err := m.runnerOf(bx)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(m.boxDir(bx.Name), 0o700); err != nil {
		return fmt.Errorf("box: %w", err)
	}
	m.trimConsole(bx.Name)
	began := time.Now()
	mach, err := r.Restore(ctx, snap, runner.RestoreOptions{
		Disk: disk, Console: m.consolePath(bx.Name), LongLived: longLived, HostPorts: bx.HostPorts,
	})
	if err != nil {
		_ = os.Remove(disk)
		return err
	}
	restored := time.Now()
	if err := m.attach(ctx, bx.Name, mach, false); err != nil {
		_ = os.Remove(disk) // its machine has stopped
		return err
	}
	attached := time.Now()
	_, c, _ := m.machine(bx.Name)
	if u.TimeUnixNano != 0 {
		u.TimeUnixNano = time.Now().UnixNano() // the clock as it is now, not when u was made
	}
	if err := c.Unique(ctx, u); err != nil {
		m.stopMachine(ctx, bx.Name)
		_ = os.Remove(disk)
		return fmt.Errorf("making box %s unique: %w", bx.Name, err)
	}
	m.log.Debug("box: restored", "box", bx.Name, "snapshot", snap, "machine", restored.Sub(began),
		"agent", attached.Sub(restored), "identity", time.Since(attached))
	if longLived {
		m.startSpares(bx.Name, mach)
	}
	return nil
}

// Fork makes boxes names from running (or hibernated) box src: each carries
// on from src's memory, disk and processes, with its own hostname,
// machine-id, fresh entropy and the host's clock. It goes in four phases:
// the snapshot the children start from (forkSnapshot), their records
// (forkRecords), their machines (startForks) and their final records
// (recordForks).
//
// On a runner.Forker, a running src stops only for as long as it takes to
// give the snapshot its memory, then goes on; the children start on src's
// spares when it has them, and the snapshot reaches the store while they
// start. Elsewhere the fork is a snapshot of src and one restore per child.
func (m *Manager) Fork(ctx context.Context, src string, names []string) ([]Box, error) {
	began := time.Now()
	if err := checkForkNames(src, names); err != nil {
		return nil, err
	}
	// src and the new names, locked in one order (no other operation holds
	// two boxes' locks).
	for _, n := range slices.Sorted(slices.Values(append([]string{src}, names...))) {
		unlock := m.lock(n)
		defer unlock()
	}
	for _, n := range names {
		if _, err := m.Get(n); err == nil {
			return nil, fmt.Errorf("%q: %w", n, ErrExists)
		}
	}
	parent, err := m.Get(src)
	if err != nil {
		return nil, err
	}
	if err := m.admit(fmt.Sprintf("a fork of %s into %d boxes", src, len(names)), forkNeed(parent.Memory, len(names))); err != nil {
		return nil, err
	}
	// The work a fork leaves for later (the snapshot's write to the store, the parent's spares for its next
	// fork) waits until the children have started: on a small host it would take CPU from them.
	started := make(chan struct{})
	startedNow := sync.OnceFunc(func() { close(started) })
	defer startedNow()
	snap, moved, err := m.forkSnapshot(ctx, &parent, started)
	if err != nil {
		return nil, err
	}
	defer m.release(snap) // what restores of it no longer need
	children, err := m.forkRecords(parent, snap, names)
	if err != nil {
		return nil, err
	}
	parentDone := make(chan error, 1)
	switch {
	case moved:
		go func() { parentDone <- m.moveParent(ctx, parent, snap) }()
	case parent.State == StateRunning: // it went on after the snapshot, its clock behind by the stop
		go func() {
			m.setClock(ctx, parent.Name)
			parentDone <- nil
		}()
	default:
		parentDone <- nil
	}
	errs := m.startForks(ctx, children, snap)
	startedNow()
	if err := <-parentDone; err != nil {
		m.log.Error("box: a fork's parent did not move", "box", src, "err", err)
	}
	if !moved && parent.State == StateRunning {
		if mach, _, ok := m.machine(parent.Name); ok {
			m.startSpares(parent.Name, mach)
		}
	}
	made, err := m.recordForks(src, children, errs)
	took := time.Since(began)
	for _, bx := range made {
		m.emit(events.Event{Type: events.Forked, Box: bx.Name, From: src, Snapshot: snap, Took: took})
	}
	return made, err
}

// checkForkNames refuses bad, repeated or clashing names for src's forks.
func checkForkNames(src string, names []string) error {
	if len(names) == 0 {
		return fmt.Errorf("fork of %s: no names: %w", src, errdefs.ErrInvalidArgument)
	}
	seen := map[string]bool{}
	for _, n := range names {
		if err := ValidateName(n); err != nil {
			return err
		}
		if seen[n] || n == src {
			return fmt.Errorf("fork of %s: name %q given twice: %w", src, n, errdefs.ErrInvalidArgument)
		}
		seen[n] = true
	}
	return nil
}

// forkSnapshot is the snapshot parent's forks start from: a new one of a
// running parent, which goes on (Fork then steps its clock and gets it
// spares for its next fork), or the one a hibernated parent sleeps in.
// moved says the parent's machine ended in the snapshot instead, for
// moveParent to start it again. The new snapshot's write to the store
// waits for started (runner.SnapshotOptions.WriteAfter).
func (m *Manager) forkSnapshot(ctx context.Context, parent *Box, started <-chan struct{}) (snap string, moved bool, err error) {
	switch parent.State {
	case StateRunning:
	case StateHibernated:
		return parent.Snapshot, false, nil
	default:
		return "", false, fmt.Errorf("box %s is %s; start it before forking: %w", parent.Name, parent.State, ErrInvalidState)
	}
	mach, err := m.running(*parent)
	if err != nil {
		return "", false, err
	}
	snap = snapName(parent, "fork")
	opts := runner.SnapshotOptions{Incremental: true, Labels: map[string]string{LabelBox: parent.Name}, WriteAfter: started}
	if moved, err := m.freezeParent(ctx, parent, mach, snap, opts); moved || err != nil {
		return snap, moved, err
	}
	take := mach.Snapshot
	if f, ok := mach.(runner.Forker); ok {
		take = f.SnapshotForFork
	}
	if _, err := take(ctx, snap, opts); err != nil {
		return "", false, fmt.Errorf("fork of %s: %w", parent.Name, err)
	}
	parent.Snapshot, parent.Disk = snap, currentDisk(mach, parent.Disk)
	if err := m.put(*parent); err != nil {
		return "", false, err
	}
	return snap, false, nil
}

// forkRecords makes and records the boxes names, forks of parent standing
// on snap: the record first, so that collect keeps what it names.
func (m *Manager) forkRecords(parent Box, snap string, names []string) ([]Box, error) {
	var children []Box
	for _, n := range names {
		child := Box{
			Name: n, State: StateStopped, Image: parent.Image, Memory: parent.Memory, CPUs: parent.CPUs,
			Runner: parent.Runner, Keys: parent.Keys, Snapshot: snap, Parent: parent.Name,
			Disk: m.newDiskPath(n), Created: nowUTC(), Note: "being forked",
			Inside: parent.Inside, MaxForks: parent.MaxForks, BaseSnapshot: parent.BaseSnapshot,
		}
		child.Owner = parent.Owner
		if err := m.put(child); err != nil {
			return nil, err
		}
		children = append(children, child)
	}
	return children, nil
}

// startForks restores every child from snap at once, each with its own
// hostname, machine-id, entropy and clock; errs[i] says why child i did
// not start.
func (m *Manager) startForks(ctx context.Context, children []Box, snap string) []error {
	errs := make([]error, len(children))
	var wg sync.WaitGroup
	for i, c := range children {
		u, err := agent.NewUnique(c.Name)
		if err != nil {
			errs[i] = err
			continue
		}
		// A box fork waiting in the guest returns in the child with it.
		u.Fork = &agent.ForkInfo{Index: i + 1, Count: len(children), Parent: c.Parent, Name: c.Name}
		wg.Go(func() { errs[i] = m.restore(ctx, c, snap, c.Disk, u) })
	}
	wg.Wait()
	return errs
}

// recordForks records each child that started as running; one that did
// not is not kept (no record, disk or machine), and the error names it.
func (m *Manager) recordForks(src string, children []Box, errs []error) ([]Box, error) {
	var out []Box
	var failed []string
	for i, bx := range children {
		bx.State, bx.Note = StateRunning, ""
		if errs[i] != nil {
			m.discard(bx)
			failed = append(failed, fmt.Sprintf("%s: %v", bx.Name, errs[i]))
			continue
		}
		if err := m.put(bx); err != nil {
			return out, err
		}
		out = append(out, bx)
	}
	if len(failed) > 0 {
		return out, fmt.Errorf("fork of %s: %s", src, strings.Join(failed, "; "))
	}
	return out, nil
}

// setClock steps box name's guest clock to the host's: a snapshot pauses
// the guest, and its clock stands still meanwhile (a fork's children and a
// resumed box get the clock with their Unique; a box that goes on after a
// snapshot needs it too). A paused box's agent cannot answer: its clock
// is stepped when it is unpaused. A guest that does not take it is
// logged, not failed: the snapshot is made.
func (m *Manager) setClock(ctx context.Context, name string) {
	if bx, err := m.Get(name); err != nil || bx.State != StateRunning {
		return
	}
	_, c, ok := m.machine(name)
	if !ok || c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, clockTimeout)
	defer cancel()
	if err := c.Unique(ctx, agent.Unique{TimeUnixNano: time.Now().UnixNano()}); err != nil {
		m.log.Warn("box: setting the clock", "box", name, "err", err)
	}
}

// clockTimeout bounds setClock: a guest that does not answer is left
// with its clock as it is.
const clockTimeout = 10 * time.Second
