package box

import (
	"context"

	"github.com/boxd-dev/boxd/events"
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
	bx, err = m.hibernateLocked(ctx, bx, events.ReasonIdle)
	return bx, err == nil, err
}
