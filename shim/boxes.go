package shim

import (
	"context"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/snapshotter"
)

// Boxes is what the shim needs of the boxd daemon; *daemon.Client is one.
// Box names are the daemon's; process ids are the kept processes' of a box.
type Boxes interface {
	// Create makes and boots a box; Get reads one; Remove deletes one in
	// any state, with its snapshots that no other box stands on.
	Create(ctx context.Context, req daemon.CreateRequest) (box.Box, error)
	Get(ctx context.Context, name string) (box.Box, error)
	Remove(ctx context.Context, name string) error
	// Stop stops a box's machine and keeps its disk and snapshots.
	Stop(ctx context.Context, name string) (box.Box, error)
	Pause(ctx context.Context, name string) (box.Box, error)
	Unpause(ctx context.Context, name string) (box.Box, error)
	// Snapshot saves a running box as snapshot box.NAME.SNAP.
	Snapshot(ctx context.Context, name, snap string) (snapshotter.Snapshot, error)
	// Stats measures what boxes use of the host now.
	Stats(ctx context.Context, opts daemon.StatsOptions) ([]box.Usage, error)

	// ProcessStream starts kept process spec.ID in box name (or attaches
	// to it: spec.Attach) and copies its streams to and from stdio until
	// it has exited and all its output was written; it returns its exit
	// status. An error that wraps ErrDetached says the link to the box
	// broke first: the process runs on, and ProcessStream with Attach
	// takes up its streams where they were left.
	ProcessStream(ctx context.Context, name string, spec agent.ProcessSpec, stdio ProcessIO) (int, error)
	Processes(ctx context.Context, name string) ([]agent.ProcessInfo, error)
	SignalProcess(ctx context.Context, name, id string, sig int) error
	ResizeProcess(ctx context.Context, name, id string, rows, cols int) error
	CloseProcessStdin(ctx context.Context, name, id string) error
	// ForgetProcess kills a kept process if it runs and forgets it.
	ForgetProcess(ctx context.Context, name, id string) error

	// AddRootfs puts the root file system at source (a mount of the
	// daemon's containerd snapshotter) in box name for container id, with
	// a label of the box's while it is there, and returns where it is in
	// the box; RemoveRootfs takes it and the label labelKey out.
	AddRootfs(ctx context.Context, name, id, source string, label map[string]string) (string, error)
	RemoveRootfs(ctx context.Context, name, id, labelKey string) error
}

// ProcessIO is a kept process's streams on the shim's side.
type ProcessIO = agent.ProcessIO

// ErrDetached is what ProcessStream's error wraps when the link to the box
// broke while the process ran on.
var ErrDetached = agent.ErrDetached

var _ Boxes = (*daemon.Client)(nil)
