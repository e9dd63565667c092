package box

import (
	"context"
	"fmt"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// freezer is a machine that can end in a snapshot whose memory is its own memory file, frozen in place rather
// than copied (runner/qemu's Machine.Freeze of a machine that owns its memory).
type freezer interface {
	Freeze(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error)
	OwnsMemory() bool
}

// moveSparer is a machine that can start spares on its own memory file for a fork that freezes it
// (runner/qemu's Machine.StartMoveSpares).
type moveSparer interface {
	StartMoveSpares(ctx context.Context, n int) error
	OwnsMemory() bool
}

// startMoveSpares starts n spares for box name's next fork on the memory its machine owns, when the parent will
// move (Config.ForkMovesParent): the parent and its children take them. It says whether it did.
func (m *Manager) startMoveSpares(name string, mach runner.Machine, n int) bool {
	ms, ok := mach.(moveSparer)
	if !m.cfg.ForkMovesParent || !ok || !ms.OwnsMemory() {
		return false
	}
	go func() {
		if err := ms.StartMoveSpares(context.Background(), n); err != nil && mach.Err() == nil {
			m.log.Warn("box: no spares for forks", "box", name, "err", err)
		}
	}()
	return true
}

// freezeParent takes the snapshot of a fork whose parent moves (Config.ForkMovesParent): the parent's machine
// ends in snap, its memory file frozen as the snapshot's, nothing copied, and its agent client is held for the
// machine it goes on in (moveParent). Until then the parent is recorded hibernated in snap, which it can resume
// from if the move fails. moved is false where the parent's machine cannot freeze so: the caller forks as usual.
func (m *Manager) freezeParent(ctx context.Context, parent *Box, mach runner.Machine, snap string, opts runner.SnapshotOptions) (moved bool, err error) {
	fz, ok := mach.(freezer)
	if !m.cfg.ForkMovesParent || !ok || !fz.OwnsMemory() {
		return false, nil
	}
	s, err := fz.Freeze(ctx, snap, opts)
	if err != nil { // the parent runs on
		return false, fmt.Errorf("fork of %s: %w", parent.Name, err)
	}
	m.holdClient(parent.Name)
	m.detach(parent.Name) // its QEMU ends by itself
	parent.State, parent.Snapshot, parent.Note = StateHibernated, snap, "moving to a new machine after a fork"
	if d := m.snapshotDisk(s); d != "" {
		parent.Disk = d
	}
	return true, m.put(*parent)
}

// moveParent starts a fork's parent that freezeParent ended again from snap, in a machine that maps the frozen
// memory copy-on-write as its children's do, and moves its agent link there: its SSH sessions go on. It gets
// spares for its next fork.
func (m *Manager) moveParent(ctx context.Context, parent Box, snap string) error {
	disk := m.newDiskPath(parent.Name)
	if err := m.restoreWith(ctx, parent, snap, disk, agent.Unique{TimeUnixNano: 1}, false); err != nil {
		return fmt.Errorf("fork of %s: the parent stays hibernated in %s: %w", parent.Name, snap, err)
	}
	if mach, _, ok := m.machine(parent.Name); ok {
		m.startSpares(parent.Name, mach)
	}
	parent.State, parent.Disk, parent.Note = StateRunning, disk, ""
	return m.put(parent)
}
