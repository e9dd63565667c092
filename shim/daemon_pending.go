package shim

import (
	"context"
	"fmt"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/containerd/errdefs"
)

// daemonBoxes is the daemon's client with the kept-process calls this
// daemon client does not make yet: each fails as not implemented.
type daemonBoxes struct{ *daemon.Client }

func newDaemonBoxes(c *daemon.Client) Boxes { return daemonBoxes{c} }

func errNoKeptProcesses() error {
	return fmt.Errorf("this boxd daemon client runs no kept processes: %w", errdefs.ErrNotImplemented)
}

func (daemonBoxes) ProcessStream(context.Context, string, agent.ProcessSpec, ProcessIO) (int, error) {
	return 0, errNoKeptProcesses()
}

func (daemonBoxes) Processes(context.Context, string) ([]agent.ProcessInfo, error) {
	return nil, errNoKeptProcesses()
}

func (daemonBoxes) SignalProcess(context.Context, string, string, int) error {
	return errNoKeptProcesses()
}

func (daemonBoxes) ResizeProcess(context.Context, string, string, int, int) error {
	return errNoKeptProcesses()
}

func (daemonBoxes) CloseProcessStdin(context.Context, string, string) error {
	return errNoKeptProcesses()
}

func (daemonBoxes) ForgetProcess(context.Context, string, string) error {
	return errNoKeptProcesses()
}
