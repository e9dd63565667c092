package box

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
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
	return m.setPausedLocked(ctx, bx, pause)
}

func (m *Manager) setPausedLocked(ctx context.Context, bx Box, pause bool) (Box, error) {
	mach, err := m.running(bx)
	if err != nil {
		return bx, err
	}
	if pause {
		err, bx.State = mach.Pause(ctx), StatePaused
	} else {
		err, bx.State = mach.Resume(ctx), StateRunning
	}
	if err != nil {
		return bx, err
	}
	return bx, m.put(bx)
}

// running returns bx's machine, or an error saying why there is none.
func (m *Manager) running(bx Box) (*qemu.Machine, error) {
	mach, _, ok := m.machine(bx.Name)
	if (bx.State != StateRunning && bx.State != StatePaused) || !ok {
		return nil, fmt.Errorf("box %s is %s: %w", bx.Name, bx.State, ErrInvalidState)
	}
	return mach, nil
}

// Snapshot saves running box name as snapshot box.NAME.SNAP (SNAP chosen
// when empty), a delta against its previous one; the box goes on.
func (m *Manager) Snapshot(ctx context.Context, name, snap string) (snapshotter.Snapshot, error) {
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
	bx.Snapshot, bx.Disk = full, mach.Disk()
	return s, m.put(bx)
}

// Hibernate snapshots running box name into the store and stops its
// machine, freeing its memory. If the snapshot fails (a full disk), the box
// keeps running.
func (m *Manager) Hibernate(ctx context.Context, name string) (Box, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	return m.hibernateLocked(ctx, bx)
}

// hibernateLocked is Hibernate of bx with its lock held.
func (m *Manager) hibernateLocked(ctx context.Context, bx Box) (Box, error) {
	mach, err := m.running(bx)
	if err != nil {
		return Box{}, err
	}
	snap := snapName(&bx, "hibernate")
	s, err := mach.Snapshot(ctx, snap, runner.SnapshotOptions{Incremental: true, Labels: map[string]string{LabelBox: bx.Name}})
	if err != nil {
		return bx, fmt.Errorf("hibernating box %s (it keeps running): %w", bx.Name, err)
	}
	top := mach.Disk()
	m.stopMachine(ctx, bx.Name)
	_ = os.Remove(top) // the empty overlay after the snapshot; resume makes a new one
	bx.State, bx.Snapshot, bx.Disk = StateHibernated, snap, s.Labels[qemu.LabelDisk]
	return bx, m.put(bx)
}

// Resume brings hibernated box name back from its snapshot.
func (m *Manager) Resume(ctx context.Context, name string) (Box, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	if bx.State != StateHibernated {
		return bx, fmt.Errorf("box %s is %s, not hibernated: %w", name, bx.State, ErrInvalidState)
	}
	return m.resume(ctx, bx)
}

// resume restores bx from its snapshot onto a fresh disk overlay.
func (m *Manager) resume(ctx context.Context, bx Box) (Box, error) {
	unique, err := agent.NewUnique("")
	if err != nil {
		return bx, err
	}
	unique.MachineID = "" // the same box: only entropy and the clock are new
	disk := m.newDiskPath(bx.Name)
	if err := m.restoreWith(ctx, bx.Name, bx.Snapshot, disk, unique, true); err != nil {
		return bx, fmt.Errorf("resuming box %s: %w", bx.Name, err)
	}
	bx.State, bx.Disk, bx.Note = StateRunning, disk, ""
	return bx, m.put(bx)
}

// restore starts box name's machine from snap on a new overlay at disk,
// mapping the snapshot's frozen memory copy-on-write, waits for its agent
// and gives the guest u.
func (m *Manager) restore(ctx context.Context, name, snap, disk string, u agent.Unique) error {
	return m.restoreWith(ctx, name, snap, disk, u, false)
}

// restoreWith is restore; with own, the machine gets a memory file of its
// own (qemu.MemoryOwn) and spares for forks.
func (m *Manager) restoreWith(ctx context.Context, name, snap, disk string, u agent.Unique, own bool) error {
	if err := os.MkdirAll(m.boxDir(name), 0o700); err != nil {
		return fmt.Errorf("box: %w", err)
	}
	opts := map[string]string{
		qemu.OptionDisk:    disk,
		qemu.OptionConsole: filepath.Join(m.boxDir(name), "console.log"),
	}
	if own {
		opts[qemu.OptionMemory] = qemu.MemoryOwn
	}
	mach, err := m.runner.RestoreMachine(ctx, snap, runner.RestoreOptions{Options: opts})
	if err != nil {
		_ = os.Remove(disk)
		return err
	}
	if err := m.attach(ctx, name, mach); err != nil {
		return err
	}
	_, c, _ := m.machine(name)
	if u.TimeUnixNano != 0 {
		u.TimeUnixNano = time.Now().UnixNano() // the clock as it is now, not when u was made
	}
	if err := c.Unique(ctx, u); err != nil {
		m.stopMachine(ctx, name)
		return fmt.Errorf("making box %s unique: %w", name, err)
	}
	if own {
		m.warm(name, mach)
	}
	return nil
}

// Fork makes boxes names from running (or hibernated) box src: each carries
// on from src's memory, disk and processes, with its own hostname,
// machine-id, fresh entropy and the host's clock. A running src stops for
// as long as it takes to copy its memory into a frozen file of the fork's
// snapshot (the one its spares wait on), then goes on; the forks map that
// file copy-on-write, so pages they only read are in host memory once, and
// start on src's spares when it has them. The snapshot reaches the store
// while they start.
func (m *Manager) Fork(ctx context.Context, src string, names []string) ([]Box, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("fork of %s: no names: %w", src, errdefs.ErrInvalidArgument)
	}
	seen := map[string]bool{}
	for _, n := range names {
		if err := ValidateName(n); err != nil {
			return nil, err
		}
		if seen[n] || n == src {
			return nil, fmt.Errorf("fork of %s: name %q given twice: %w", src, n, errdefs.ErrInvalidArgument)
		}
		seen[n] = true
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
	var snap string
	switch parent.State {
	case StateRunning:
		mach, err := m.running(parent)
		if err != nil {
			return nil, err
		}
		snap = snapName(&parent, "fork")
		if _, err := mach.Fork(ctx, snap, runner.SnapshotOptions{Incremental: true, Labels: map[string]string{LabelBox: src}}); err != nil {
			return nil, fmt.Errorf("fork of %s: %w", src, err)
		}
		parent.Snapshot, parent.Disk = snap, mach.Disk()
		if err := m.put(parent); err != nil {
			return nil, err
		}
		// Spares for its next fork.
		m.warm(src, mach)
	case StateHibernated:
		snap = parent.Snapshot
	default:
		return nil, fmt.Errorf("box %s is %s; start it before forking: %w", src, parent.State, ErrInvalidState)
	}
	defer m.runner.DropFrozen(snap) // if nothing ever maps it

	type job struct {
		bx     Box
		unique agent.Unique
	}
	var jobs []job
	for _, n := range names {
		u, err := agent.NewUnique(n)
		if err != nil {
			return nil, err
		}
		child := Box{
			Name: n, State: StateRunning, Image: parent.Image, Memory: parent.Memory, CPUs: parent.CPUs,
			Keys: parent.Keys, Snapshot: snap, Parent: src, Disk: m.newDiskPath(n), Created: nowUTC(),
		}
		jobs = append(jobs, job{child, u})
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		// The record first (with the snapshot it stands on): collect
		// keeps what a box's record names.
		if errs[i] = m.put(Box{Name: j.bx.Name, State: StateStopped, Image: j.bx.Image, Memory: j.bx.Memory,
			CPUs: j.bx.CPUs, Keys: j.bx.Keys, Snapshot: snap, Parent: src, Disk: j.bx.Disk, Created: j.bx.Created,
			Note: "being forked"}); errs[i] != nil {
			continue
		}
		wg.Go(func() { errs[i] = m.restore(ctx, j.bx.Name, snap, j.bx.Disk, j.unique) })
	}
	wg.Wait()
	m.runner.DropSpares(snap) // spares the forks did not take
	var out []Box
	var failed []string
	for i, j := range jobs {
		bx := j.bx
		if errs[i] != nil {
			// The snapshot holds it all: the box can resume from it.
			bx.State, bx.Snapshot, bx.Note = StateHibernated, snap, "fork failed to start: "+errs[i].Error()
			failed = append(failed, fmt.Sprintf("%s: %v", bx.Name, errs[i]))
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
