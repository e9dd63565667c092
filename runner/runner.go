// Package runner defines the interface every VM backend implements: start a
// machine fresh or from a snapshot, pause, resume, snapshot, stop. The
// interface is the spec; runnertest holds the conformance suite every
// backend runs against itself.
package runner

import (
	"context"

	"github.com/boxd-dev/boxd/snapshotter"
)

// Runner starts machines of one backend.
type Runner interface {
	// Name is the backend's name: "kvm", "qemu".
	Name() string

	// Capabilities says what the backend can do on this host.
	Capabilities() Capabilities

	// Start boots a fresh machine from spec and leaves it running. It
	// refuses a spec it cannot run (errdefs.ErrInvalidArgument) and a host that
	// lacks what it needs (errdefs.ErrNotImplemented, naming it: "/dev/kvm", "vmx").
	Start(ctx context.Context, spec Spec) (Machine, error)

	// Restore starts a machine from a snapshot this backend took: memory,
	// registers and devices as they were. With Capabilities.LazyMemory the
	// memory is served as the guest touches it, the recorded working set
	// first. An unknown snapshot is errdefs.ErrNotFound; a snapshot whose
	// chunks are missing fails before the machine runs, and a damaged chunk
	// stops the machine with errdefs.ErrDataLoss when it is needed: never a
	// wrong page. The snapshot and any machine it came from are unaffected.
	Restore(ctx context.Context, snapshot string, opts RestoreOptions) (Machine, error)
}

// Capabilities are what a backend can do.
type Capabilities struct {
	// LazyMemory: Restore serves memory on first touch instead of copying it.
	LazyMemory bool `json:"lazy_memory"`
	// IncrementalSnapshots: a snapshot stores only what changed since the
	// machine's previous one.
	IncrementalSnapshots bool `json:"incremental_snapshots"`
	// Linux: the backend can boot a Linux guest on this host.
	Linux bool `json:"linux"`
}

// Spec describes a fresh machine.
type Spec struct {
	MemSize int64 // bytes of guest RAM
	CPUs    int   // vCPUs (0 means 1)
	// Boot is what to run: the guest binary (kvm) or kernel (qemu).
	Boot string
	// Options are backend-specific settings, documented by each backend.
	Options map[string]string
}

// RestoreOptions tune Restore.
type RestoreOptions struct {
	// Paused leaves the machine paused, for the caller to Resume.
	Paused bool
	// Unique gives the machine fresh entropy on its first step, so that
	// forks of one snapshot do not share random state.
	Unique bool
	// Options are backend-specific settings for the new machine (its disk,
	// its console file), documented by each backend.
	Options map[string]string
}

// SnapshotOptions tune Machine.Snapshot.
type SnapshotOptions struct {
	// Incremental stores only the memory changed since the machine's
	// previous snapshot (the last one it took, or the one it was restored
	// from). Without a previous snapshot, or without the capability, the
	// snapshot is full.
	Incremental bool
	// Labels are kept with the snapshot.
	Labels map[string]string
}

// Machine is one running (or paused, or stopped) VM.
type Machine interface {
	// ID names the machine for logs and errors.
	ID() string

	// Pause stops every vCPU at an instruction boundary with pending I/O
	// completed, so that what Snapshot saves is consistent. Pausing a
	// paused machine does nothing; a stopped machine returns why it stopped.
	Pause(ctx context.Context) error

	// Resume lets a paused machine run on.
	Resume(ctx context.Context) error

	// Snapshot saves the machine into the store as a new snapshot called
	// name (a parent-linked chain: its parent is the machine's previous
	// snapshot). A running machine is paused for it and resumed after; a
	// paused one stays paused. An existing name is errdefs.ErrAlreadyExists and
	// changes nothing.
	Snapshot(ctx context.Context, name string, opts SnapshotOptions) (snapshotter.Snapshot, error)

	// Stop ends the machine and frees what it holds. It may be called more
	// than once.
	Stop(ctx context.Context) error

	// Done is closed when the machine has stopped, by Stop or on its own
	// (a guest that halts or crashes); Err then says why.
	Done() <-chan struct{}
	Err() error

	// Console returns everything the machine wrote to its console so far.
	Console() []byte
}

// Observer is how the conformance suite sees inside a backend's test guest.
type Observer interface {
	// Next returns the guest's observation at its next step: a checksum
	// of its memory and a counter that grows as it runs. A paused machine
	// is resumed to take that step (and keeps running).
	Next(ctx context.Context, m Machine) (Observation, error)
}

// Observation is a guest's checksum and counter at one step.
type Observation struct {
	Checksum uint64
	Counter  uint64
}
