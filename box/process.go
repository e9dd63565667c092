package box

import (
	"context"
	"fmt"

	"github.com/boxd-dev/boxd/agent"
	"github.com/containerd/errdefs"
)

// withClient calls fn with the agent client of box name, which holds kept
// processes (see keptClient).
func withClient[T any](ctx context.Context, m *Manager, name string, fn func(c *agent.Client) (T, error)) (T, error) {
	c, err := m.keptClient(ctx, name)
	if err != nil {
		var zero T
		return zero, err
	}
	return fn(c)
}

// done adapts a call that returns only an error to withClient.
func done(err error) (struct{}, error) { return struct{}{}, err }

// Process starts, or attaches to, a kept process in box name (see
// agent.Client.Process): the process outlives this call, and an error
// wrapping agent.ErrDetached says it runs on.
func (m *Manager) Process(ctx context.Context, name string, spec agent.ProcessSpec, stdio agent.ProcessIO) (int, error) {
	client := m.Client
	if spec.Attach {
		client = m.keptClient
	}
	c, err := client(ctx, name)
	if err != nil {
		return -1, err
	}
	return c.Process(ctx, spec, stdio)
}

// Processes lists the kept processes of box name.
func (m *Manager) Processes(ctx context.Context, name string) ([]agent.ProcessInfo, error) {
	return withClient(ctx, m, name, func(c *agent.Client) ([]agent.ProcessInfo, error) { return c.Processes(ctx) })
}

// SignalProcess sends Linux signal sig to kept process id of box name.
func (m *Manager) SignalProcess(ctx context.Context, name, id string, sig int) error {
	_, err := withClient(ctx, m, name, func(c *agent.Client) (struct{}, error) { return done(c.SignalProcess(ctx, id, sig)) })
	return err
}

// ResizeProcess changes the terminal of kept process id of box name.
func (m *Manager) ResizeProcess(ctx context.Context, name, id string, rows, cols int) error {
	_, err := withClient(ctx, m, name, func(c *agent.Client) (struct{}, error) { return done(c.ResizeProcess(ctx, id, rows, cols)) })
	return err
}

// CloseProcessStdin ends the input of kept process id of box name.
func (m *Manager) CloseProcessStdin(ctx context.Context, name, id string) error {
	_, err := withClient(ctx, m, name, func(c *agent.Client) (struct{}, error) { return done(c.CloseProcessStdin(ctx, id)) })
	return err
}

// ForgetProcess kills kept process id of box name if it runs and forgets
// it.
func (m *Manager) ForgetProcess(ctx context.Context, name, id string) error {
	_, err := withClient(ctx, m, name, func(c *agent.Client) (struct{}, error) { return done(c.ForgetProcess(ctx, id)) })
	return err
}

// keptClient is Client for a call about kept processes that already run:
// a hibernated box is resumed (its processes are in its snapshot) and a
// paused one unpaused, but a stopped box is not booted, since its
// processes ended with its machine.
func (m *Manager) keptClient(ctx context.Context, name string) (*agent.Client, error) {
	bx, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	mach, _, ok := m.machine(name)
	live := bx.State == StateHibernated || (ok && mach.Err() == nil)
	if bx.State == StateStopped || !live {
		return nil, fmt.Errorf("box %s is stopped: its kept processes ended with its machine: %w", name, errdefs.ErrNotFound)
	}
	return m.Client(ctx, name)
}
