package box

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// LabelBox is the label the box manager puts on the snapshots a box takes
// (snapshot, hibernate, fork): the box's name.
const LabelBox = "boxd.box"

// FromOptions describe a box made from a box's snapshot.
type FromOptions struct {
	Name string
	// Snapshot is a snapshot a box took: box.NAME.SNAP, as boxd snapshots
	// lists them.
	Snapshot string
	Keys     []string
	// NoInside, MaxForks and HostPorts are as in CreateOptions.
	NoInside  bool
	MaxForks  int
	HostPorts []uint16
	// Labels are the box's Labels.
	Labels map[string]string
}

// CreateFrom makes box opts.Name from snapshot opts.Snapshot, which a box
// took, and starts it: like a fork's child, it carries on from the
// snapshot's memory, disk and processes, with its own hostname and
// machine-id, fresh entropy and the host's clock. Its parent is the box
// that took the snapshot; its image, memory and vCPUs are the snapshot's.
//
// An unknown snapshot is errdefs.ErrNotFound; one no box took (an image, a
// snapshot made with boxd store) is errdefs.ErrInvalidArgument. If the box
// does not come up, nothing of it is kept.
func (m *Manager) CreateFrom(ctx context.Context, opts FromOptions) (Box, error) {
	began := time.Now()
	if err := ValidateName(opts.Name); err != nil {
		return Box{}, err
	}
	sn, err := m.boxSnapshot(opts.Snapshot)
	if err != nil {
		return Box{}, err
	}
	r, spec, err := m.snapshotMachine(sn)
	if err != nil {
		return Box{}, err
	}
	if err := m.admit("box "+opts.Name, forkNeed(spec.MemSize, 1)); err != nil {
		return Box{}, err
	}
	parent := sn.Labels[LabelBox]
	unique, err := agent.NewUnique(opts.Name)
	if err != nil {
		return Box{}, err
	}

	unlock := m.lock(opts.Name)
	defer unlock()
	if _, err := m.Get(opts.Name); err == nil {
		return Box{}, fmt.Errorf("%q: %w", opts.Name, ErrExists)
	}
	bx := Box{
		Name: opts.Name, State: StateStopped, Memory: spec.MemSize, CPUs: spec.CPUs,
		Runner: r.Name(), Keys: opts.Keys, Parent: parent, Disk: m.newDiskPath(opts.Name), Created: nowUTC(),
		Snapshot: sn.Name, // it stands on it already: removing other boxes keeps it
		Note:     "being made from snapshot " + sn.Name,
		Inside:   !opts.NoInside, MaxForks: opts.MaxForks, Labels: opts.Labels,
	}
	bx.Image, bx.BaseSnapshot = m.baseOf(sn, parent)
	if bx.HostPorts, err = CheckHostPorts(opts.HostPorts); err != nil {
		return Box{}, err
	}
	if bx.MaxForks == 0 {
		bx.MaxForks = DefaultMaxForks
	}
	if err := m.put(bx); err != nil {
		return Box{}, err
	}
	// Long-lived: the box's memory is its own, served lazily from the store
	// when the snapshot's memory is not at hand.
	if err := m.restoreWith(ctx, bx, sn.Name, bx.Disk, unique, true); err != nil {
		// A box left hibernated on the snapshot would resume as its
		// parent's twin (a resume keeps the hostname and machine-id), so
		// nothing is kept.
		m.discard(bx)
		return Box{}, fmt.Errorf("box %s from snapshot %s: %w", bx.Name, sn.Name, err)
	}
	bx.State, bx.Snapshot, bx.Note = StateRunning, sn.Name, ""
	if err := m.put(bx); err != nil {
		return bx, err
	}
	m.emit(events.Event{Type: events.Created, Box: bx.Name, From: sn.Name, Took: time.Since(began)})
	return bx, nil
}

// boxSnapshot returns snapshot name if a box took it.
func (m *Manager) boxSnapshot(name string) (snapshotter.Snapshot, error) {
	if name == "" {
		return snapshotter.Snapshot{}, fmt.Errorf("no snapshot named to make the box from: %w", errdefs.ErrInvalidArgument)
	}
	if err := snapshotter.ValidateName(name); err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot: %w", err)
	}
	sn, err := m.cfg.Graph.Get(name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return snapshotter.Snapshot{}, fmt.Errorf("no snapshot %q (boxd snapshots lists the boxes' snapshots): %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	if sn.Labels[LabelBox] == "" {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot %q was not taken by a box (boxd snapshots lists those; an image is made into a box with --image): %w", name, errdefs.ErrInvalidArgument)
	}
	return sn, nil
}

// snapshotMachine is the runner that took snapshot sn and the machine sn
// restores as (runner.SpecReader).
func (m *Manager) snapshotMachine(sn snapshotter.Snapshot) (runner.Runner, runner.Spec, error) {
	name := sn.Labels[runner.LabelRunner]
	r := m.runners[name]
	if r == nil {
		return nil, runner.Spec{}, errcat.NotSupported("snapshot %s was taken on the %q runner, which this boxd does not have", sn.Name, name)
	}
	sr, ok := r.(runner.SpecReader)
	if !ok {
		return nil, runner.Spec{}, errcat.NotSupported("the %s runner cannot say what machine snapshot %s is, to make a box of it", name, sn.Name)
	}
	spec, err := sr.SnapshotSpec(sn)
	if err != nil {
		return nil, runner.Spec{}, fmt.Errorf("snapshot %s: %w", sn.Name, err)
	}
	return r, spec, nil
}

// baseOf names what a box made from snapshot sn of box parent starts
// from: the image, or the base snapshot (Box.BaseSnapshot) when that is no
// image. They are parent's, or, with parent gone, where the snapshot's
// chain of parents starts: the first snapshot no box took.
func (m *Manager) baseOf(sn snapshotter.Snapshot, parent string) (image, base string) {
	if p, err := m.Get(parent); err == nil {
		return p.Image, p.BaseSnapshot
	}
	for range 100000 { // a chain is finite; the bound guards a damaged one
		if img := sn.Labels[guest.LabelImage]; img != "" {
			return img, ""
		}
		if sn.Labels[LabelBox] == "" {
			return "", sn.Name
		}
		if sn.Parent == "" {
			return "", ""
		}
		next, err := m.cfg.Graph.Get(sn.Parent)
		if err != nil {
			return "", ""
		}
		sn = next
	}
	return "", ""
}

// discard deletes what there is of bx, a box that never came up: its
// record, its disk's top and its folder.
func (m *Manager) discard(bx Box) {
	m.stopMachine(context.Background(), bx.Name)
	if err := m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(bx.Name)) }); err != nil {
		m.log.Error("box: forgetting a box that did not come up", "box", bx.Name, "err", err)
	}
	_ = os.Remove(bx.Disk)
	_ = os.RemoveAll(m.boxDir(bx.Name))
}
