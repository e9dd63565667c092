package box

import "github.com/boxd-dev/boxd/agent"

// ServeInside is serveInside, for the tests of package box_test: what
// the box command inside box name gets answered.
func (m *Manager) ServeInside(name string) agent.HostHandler { return m.serveInside(name) }
