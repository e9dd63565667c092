package box

import (
	"context"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/runner"
)

// holdClient keeps box name's agent client while its machine goes away (a hibernation): its link waits, with
// the SSH connection over it and what the front door relays on it, for the machine the box comes back in.
// The caller holds the box's lock.
func (m *Manager) holdClient(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.clients[name]; c != nil {
		// Streams of kept processes end detached, as they did when the
		// link ended with the machine; sessions wait.
		c.DetachProcesses()
		c.OnChannelBreak(nil) // its channel ends with the machine, as asked
		delete(m.clients, name)
		if old := m.held[name]; old != nil {
			_ = old.Close()
		}
		m.held[name] = c
	}
}

// dropHeld closes the client held for box name, if any: the box will not come back as it was.
func (m *Manager) dropHeld(name string) {
	m.mu.Lock()
	c := m.held[name]
	delete(m.held, name)
	m.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
}

// resumeHeld moves the client held for box name onto mach's agent socket and returns it, or nil when none is
// held or its link cannot go on there (the box's agent started afresh): the caller dials a new one.
func (m *Manager) resumeHeld(ctx context.Context, name string, ah runner.AgentHost) *agent.Client {
	m.mu.Lock()
	c := m.held[name]
	delete(m.held, name)
	m.mu.Unlock()
	if c == nil {
		return nil
	}
	if err := c.Move(ctx, ah.AgentSocket()); err != nil {
		m.log.Info("box: the agent link did not resume; dialling a new one", "box", name, "err", err)
		_ = c.Close()
		return nil
	}
	return c
}
