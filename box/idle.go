package box

import (
	"context"
	"fmt"
	"os"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// HibernateIfIdle hibernates box name if it is running and idle says it is
// idle, and reports whether it did. idle is asked while the box's lock is
// held, the lock every use of the box takes (Client, Exec, and so every
// SSH connection) before it reaches the machine, and the hibernation
// happens under the same hold. So a caller that counts uses before they
// take the box (as the daemon does) cannot lose one to a hibernation
// decided a moment too early: a use counted before idle is asked keeps the
// box running, and one that comes later waits for the lock and then finds
// the box hibernated and resumes it.
//
// A box that is not running (stopped, paused, hibernated, or changed since
// the caller looked) is left alone without asking idle. If the snapshot
// fails, the box keeps running and the error says so.
func (m *Manager) HibernateIfIdle(ctx context.Context, name string, idle func() bool) (Box, bool, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, false, err
	}
	if bx.State != StateRunning || !idle() {
		return bx, false, nil
	}
	bx, err = m.hibernateLocked(ctx, bx)
	return bx, err == nil, err
}

// hibernateLocked is Hibernate of bx with its lock held.
//
// It repeats the body of Hibernate in lifecycle.go, which takes the lock
// itself; the two should become one (Hibernate calling this) once
// lifecycle.go can be changed.
func (m *Manager) hibernateLocked(ctx context.Context, bx Box) (Box, error) {
	mach, err := m.running(bx)
	if err != nil {
		return Box{}, err
	}
	snap := snapName(&bx, "hibernate")
	s, err := mach.Snapshot(ctx, snap, runner.SnapshotOptions{Incremental: true, Labels: map[string]string{"boxd.box": bx.Name}})
	if err != nil {
		return bx, fmt.Errorf("hibernating box %s (it keeps running): %w", bx.Name, err)
	}
	top := mach.Disk()
	m.stopMachine(ctx, bx.Name)
	_ = os.Remove(top) // the empty overlay after the snapshot; resume makes a new one
	bx.State, bx.Snapshot, bx.Disk = StateHibernated, snap, s.Labels[qemu.LabelDisk]
	return bx, m.put(bx)
}
