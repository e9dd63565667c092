// Package runner defines the interface every VM backend implements: start a
// machine fresh or from a snapshot, pause, continue, snapshot, stop. The
// interfaces are the spec; runnertest holds the conformance suite every
// backend runs against itself.
//
// Beyond the base Runner and Machine, a backend may offer optional
// capabilities, each a small interface in capabilities.go that a caller
// discovers with a type assertion. Each says what the box manager does
// where a backend lacks it.
package runner

import (
	"context"
	"errors"

	"github.com/boxd-dev/boxd/snapshotter"
)

// LabelRunner is the snapshot label that names the backend (Runner.Name)
// that took a snapshot. Every backend sets it; Restore refuses another
// backend's snapshot.
const LabelRunner = "boxd.runner"

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
	// Linux: the backend can boot a Linux guest (Spec.Kernel a Linux
	// kernel) on this host.
	Linux bool `json:"linux"`
	// NoLinux says why Linux is false, in words that can follow "cannot
	// boot Linux guests here: ".
	NoLinux string `json:"no_linux,omitempty"`
}

// Spec describes a fresh machine. A backend refuses a setting it does not
// support (errdefs.ErrInvalidArgument) rather than ignoring it.
type Spec struct {
	MemSize int64 // bytes of guest RAM
	CPUs    int   // vCPUs (0 means 1)
	// Kernel is what to boot: a Linux kernel image, or a backend's own
	// test guest (documented by the backend).
	Kernel  string
	Initrd  string // an initramfs, optional
	Cmdline string // the kernel command line, optional
	// Console is a file the serial console is appended to; "" keeps it in
	// the backend's own folder for the machine's life (Machine.Console
	// returns it either way).
	Console string
	// Disk is the machine's disk, as virtio-blk; nil for none.
	Disk *Disk
	// Network is NetworkUser ("" too) or NetworkNone.
	Network string
	// HostPorts are TCP ports on the host's loopback that the guest may
	// reach at the gateway address (10.0.2.2). Without them a user network
	// reaches no address of the host's. A snapshot does not keep them.
	HostPorts []uint16
	// CPUModel is the guest's CPU model, in the backend's terms; "" is the
	// backend's default for a new machine. The spec of a snapshot names
	// the model it was taken on, which its restores keep: a running guest
	// must not lose a CPU feature it has seen.
	CPUModel string
	// Layout names the machine's devices as the backend lays them out, in
	// its terms; "" is the backend's default for a new machine. Like
	// CPUModel, a restore keeps the layout its snapshot was taken on: a
	// device state loads only into the devices it came from.
	Layout string
}

// Networks a machine may have.
const (
	// NetworkUser is outbound access through the backend's user-mode
	// network: the guest at 10.0.2.15, the gateway 10.0.2.2, DNS 10.0.2.3.
	// It reaches the internet and DNS, never the host's own addresses
	// (its loopback included, but for Spec.HostPorts), link-local ones or
	// other machines.
	NetworkUser = "user"
	NetworkNone = "none"
)

// Disk is a machine's writable disk.
type Disk struct {
	// Path is the file the machine writes (with DiskFiles, one that
	// CreateDisk made).
	Path string
	// Base names the snapshot in the store whose disk the file starts
	// from (an image): a machine's first snapshot stores its disk as a
	// delta against it. "" for a disk that stands on nothing stored.
	Base string
}

// RestoreOptions tune Restore.
type RestoreOptions struct {
	// Paused leaves the machine paused, for the caller to Continue.
	Paused bool
	// Unique gives the machine fresh entropy on its first step, so that
	// forks of one snapshot do not share random state.
	Unique bool
	// Disk is where the machine's writable disk goes, over the snapshot's
	// disk; "" lets the backend choose a place that goes with the machine.
	Disk string
	// Console is as Spec.Console.
	Console string
	// LongLived says the machine will outlive the snapshot's other
	// restores (a box woken from hibernation, not a fork): a backend that
	// shares memory between restores of one snapshot gives this one memory
	// of its own. Others ignore it.
	LongLived bool
	// HostPorts are as Spec.HostPorts.
	HostPorts []uint16
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
	// WriteAfter, when not nil, holds back the write of a snapshot that
	// reaches the store after it is taken (a BackgroundWriter's) until it
	// is closed: the caller has work to do first that should not share the
	// CPU with the write, such as starting a fork's children. Whatever needs
	// the snapshot in the store (Flush, a later snapshot) writes it at once;
	// a backend may bound the hold, or write at once regardless.
	WriteAfter <-chan struct{}
}

// Machine is one running (or paused, or stopped) VM.
type Machine interface {
	// ID names the machine for logs and errors.
	ID() string

	// Pause stops every vCPU at an instruction boundary with pending I/O
	// completed, so that what Snapshot saves is consistent. Pausing a
	// paused machine does nothing; a stopped machine returns why it stopped.
	Pause(ctx context.Context) error

	// Continue lets a paused machine run on; a running one runs on.
	Continue(ctx context.Context) error

	// Snapshot saves the machine into the store as a new snapshot called
	// name (a parent-linked chain: its parent is the machine's previous
	// snapshot), labelled LabelRunner. A running machine is paused for it
	// and continues after; a paused one stays paused. An existing name is
	// errdefs.ErrAlreadyExists and changes nothing.
	Snapshot(ctx context.Context, name string, opts SnapshotOptions) (snapshotter.Snapshot, error)

	// Stop ends the machine and frees what it holds. It may be called more
	// than once. Err is then ErrStopped.
	Stop(ctx context.Context) error

	// Done is closed when the machine has stopped, by Stop or on its own
	// (a guest that halts or crashes); Err then says why.
	Done() <-chan struct{}
	Err() error

	// Console returns everything the machine wrote to its console so far.
	Console() []byte
}

// ErrStopped is the Err of a machine that Stop ended (errors.Is matches it).
var ErrStopped = errors.New("machine stopped")

// ErrMemoryNotRestored matches the Err of a machine restored lazily that
// ended before all its memory came back from its snapshot (a damaged
// chunk, its VMM killed, the process serving its memory gone), and
// Adopter.Adopt's error for such a machine: nothing the snapshot holds is
// lost, and a restore from it starts over.
var ErrMemoryNotRestored = errors.New("its memory was not restored yet")

// Observer is how the conformance suite sees inside a backend's test guest.
type Observer interface {
	// Next returns the guest's observation at its next step: a checksum
	// of its memory and a counter that grows as it runs. A paused machine
	// is continued to take that step (and keeps running).
	Next(ctx context.Context, m Machine) (Observation, error)
}

// Observation is a guest's checksum and counter at one step.
type Observation struct {
	Checksum uint64
	Counter  uint64
}
