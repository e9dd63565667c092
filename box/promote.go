package box

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/events"
	bolt "go.etcd.io/bbolt"
)

// Promote makes fork, a box forked from box name, the new name, and
// returns it with the snapshot that keeps name's state before it. That
// snapshot (box.NAME.K-promoted when name was running) stays while name
// exists: collect keeps the snapshots of existing boxes, and the disks
// they stand on. Under both boxes' locks, fork is hibernated (so that no
// machine carries its name), name is hibernated into the kept snapshot,
// fork's record becomes name's (its name, keys and lineage; fork's disk,
// memory and processes) in one write, and name is resumed from it with
// its own hostname back. A failure before that write leaves name as it
// was and fork hibernated.
func (m *Manager) Promote(ctx context.Context, name, fork string) (Box, string, error) {
	if err := ValidateName(name); err != nil {
		return Box{}, "", err
	}
	if err := ValidateName(fork); err != nil {
		return Box{}, "", err
	}
	for _, n := range slices.Sorted(slices.Values([]string{name, fork})) {
		unlock := m.lock(n)
		defer unlock()
	}
	warm, err := m.Get(name)
	if err != nil {
		return Box{}, "", err
	}
	f, err := m.Get(fork)
	if err != nil {
		return Box{}, "", err
	}
	if name == fork || f.Parent != name {
		return Box{}, "", fmt.Errorf("box %s is not a fork of %s: %w", fork, name, ErrInvalidState)
	}
	for _, b := range []Box{warm, f} {
		switch b.State {
		case StateRunning, StatePaused, StateHibernated:
		default:
			return Box{}, "", fmt.Errorf("promoting %s to %s: box %s is %s: %w", fork, name, b.Name, b.State, ErrInvalidState)
		}
	}
	if f.State != StateHibernated {
		if f, err = m.hibernateAs(ctx, f, "promote"); err != nil {
			return Box{}, "", fmt.Errorf("promoting %s to %s: %w", fork, name, err)
		}
	}
	if warm.State != StateHibernated {
		if warm, err = m.hibernateAs(ctx, warm, "promoted"); err != nil {
			return Box{}, "", fmt.Errorf("promoting %s to %s: keeping %s's state: %w", fork, name, name, err)
		}
	}
	kept := warm.Snapshot

	nb := f
	nb.Name, nb.Parent, nb.Keys, nb.Created = name, warm.Parent, warm.Keys, warm.Created
	nb.HostPorts = warm.HostPorts
	nb.Snaps = warm.Snaps // the next snapshots are box.NAME.K+1-..., after the kept one
	nb.Note = fmt.Sprintf("promoted from fork %s; the state before is snapshot %s", fork, kept)
	v, err := json.Marshal(nb)
	if err != nil {
		return Box{}, "", err
	}
	if err := m.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucket)
		if err := b.Delete([]byte(fork)); err != nil {
			return err
		}
		return b.Put([]byte(name), v)
	}); err != nil {
		return Box{}, "", fmt.Errorf("promoting %s to %s: %w", fork, name, err)
	}
	_ = os.RemoveAll(m.boxDir(fork))

	// The same box as the fork, with name's hostname: only entropy and
	// the clock are new besides.
	u, err := agent.NewUnique(name)
	if err != nil {
		return nb, kept, err
	}
	u.MachineID = ""
	disk := m.newDiskPath(name)
	if err := m.restoreWith(ctx, nb, nb.Snapshot, disk, u, true); err != nil {
		return nb, kept, fmt.Errorf("promoted %s to %s, which stays hibernated: resuming it: %w", fork, name, err)
	}
	nb.State, nb.Disk = StateRunning, disk
	if err := m.put(nb); err != nil {
		return nb, kept, err
	}
	m.emit(events.Event{Type: events.Promoted, Box: name, From: fork, Snapshot: kept})
	return nb, kept, nil
}
