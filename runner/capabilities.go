package runner

import (
	"context"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
)

// The optional capabilities. A caller finds one with a type assertion on a
// Runner or a Machine; runnertest checks each one a backend has. Every
// interface says what the box manager does where a backend lacks it.

// AgentHost is a machine whose guest agent (boxd-agent, the box's PID 1)
// the host reaches over a byte stream served on a unix socket: one SSH
// connection at a time, as agent.Dial expects. Without it a machine
// cannot be a box: the manager refuses the runner for boxes.
type AgentHost interface {
	// AgentSocket is the socket's path. It exists from the machine's start
	// until it stops; the guest end may take a while to answer.
	AgentSocket() string
}

// CPUMeter is a machine that says how much host CPU time it has used.
// Without it the daemon judges a box idle by its connections alone.
type CPUMeter interface {
	// CPUTime is the CPU time (user and system) the machine has used since
	// it started.
	CPUTime() (time.Duration, error)
}

// MemoryMeter is a machine that says how much host memory it holds.
// Without it the manager reports no memory figure for the box.
type MemoryMeter interface {
	// Memory is the host memory the machine's process holds now. A
	// stopped machine's is an error.
	Memory() (MemoryUse, error)
}

// MemoryUse is the resident host memory of a machine, in bytes.
//
// Pages the machine's process has not mapped are not counted, even where
// they are the machine's: in a memory file that a restore filled, pages
// the guest has not touched since.
type MemoryUse struct {
	// RSS counts every resident page the machine maps in full, also the
	// pages it shares with other machines (a snapshot's frozen memory,
	// which restores map copy-on-write).
	RSS int64 `json:"rss"`
	// PSS counts a page that n processes map as 1/n of it: the PSS of
	// machines sharing memory adds up to that memory once.
	PSS int64 `json:"pss"`
}

// DiskFiles is a backend whose machines' disks are files on the host,
// layered copy-on-write: a snapshot freezes the layer the machine wrote
// and the machine goes on on a new one. Without it the manager refuses the
// runner for boxes (a box's disk outlives its machine).
type DiskFiles interface {
	// CreateDisk makes a writable disk at path that reads as base, a raw
	// disk image file that is never written, until the machine writes it.
	CreateDisk(ctx context.Context, path, base string) error

	// DiskChain lists the files the disk at path reads from, path first
	// and the raw base last. A missing file ends the list. Collecting
	// disk files keeps every file in a live disk's chain.
	DiskChain(path string) []string

	// SnapshotDisk is the file that holds the disk as snapshot s saw it
	// (the layer the snapshot froze), or "" when none is kept; a restore
	// layers its disk over it, or over the disk exported from the store.
	SnapshotDisk(s snapshotter.Snapshot) string

	// DiskOrigin says which disk a file in the disks' folder was made
	// from: the Disk.Path (or RestoreOptions.Disk) whose layer a snapshot
	// froze into it. It is "" for a file the backend did not make. The
	// manager names the disks it creates; the backend names the layers it
	// makes of them, and this is how the manager tells who owns one.
	DiskOrigin(file string) string
}

// DiskMachine is a machine whose disk file changes over its life (see
// DiskFiles). Without it the disk is the one the machine started with.
type DiskMachine interface {
	// Disk is the file the machine writes now.
	Disk() string
}

// Forker is a machine that forks faster than Snapshot followed by
// Restores. Without it, a fork is Snapshot and one Restore per child.
type Forker interface {
	// SnapshotForFork is Snapshot for a fork: the machine continues when it
	// returns, and Restores of the snapshot start at once, sharing the
	// memory they only read. The snapshot may reach the store only after
	// it returns (the backend is then a BackgroundWriter); Restore reads
	// it meanwhile.
	SnapshotForFork(ctx context.Context, name string, opts SnapshotOptions) (snapshotter.Snapshot, error)

	// StartSpares gets n machines ready, ahead of the machine's next
	// SnapshotForFork, for that snapshot's Restores to take: they start
	// no process. Spares go when the machine stops or when the snapshot
	// is released (SnapshotReleaser).
	StartSpares(ctx context.Context, n int) error
}

// BackgroundWriter is a backend that writes some snapshots to the store
// after taking them. Without it, a snapshot is in the store when Snapshot
// returns.
type BackgroundWriter interface {
	// Flush waits until every snapshot taken so far is in the store,
	// writing again one whose write failed.
	Flush(ctx context.Context) error

	// Pending lists the snapshots not in the store yet and the parents
	// they are deltas against: what must stay in the store meanwhile.
	Pending() []string
}

// SnapshotReleaser is a backend that holds host resources for a snapshot
// beyond the store: memory files that restores map, spares waiting for its
// restores, its disk exported to a file. Without it there is nothing to
// release.
type SnapshotReleaser interface {
	// ReleaseSnapshot frees the memory the backend holds for snapshot
	// name that no machine uses (what machines use goes when the last of
	// them stops): the caller restores no more of it for now. The
	// snapshot stays restorable from the store.
	ReleaseSnapshot(name string)

	// SnapshotRemoved deletes the files the backend made of snapshot name
	// for its restores (its disk exported from the store), once the
	// snapshot is gone from the store and no disk stands on them.
	SnapshotRemoved(name string)
}

// SpecReader is a backend that can say what machine a snapshot restores
// as. Without it the manager cannot make a box from a bare snapshot.
type SpecReader interface {
	// SnapshotSpec is the Spec of the machine snapshot s was taken of,
	// less its disk and console. A snapshot another backend took is
	// errdefs.ErrInvalidArgument.
	SnapshotSpec(s snapshotter.Snapshot) (Spec, error)
}

// Adopter is a backend whose machines outlive the process that started
// them, which a later process on the same folders takes over: a daemon
// that was killed leaves its boxes running, and the next one adopts them.
// Without it the manager marks the boxes a gone daemon left running
// stopped, and the next use boots them from their disks.
type Adopter interface {
	// Adopt takes over machine id (Machine.ID) as it runs or is paused.
	// The machine's agent socket (AgentHost) takes a fresh connection;
	// whatever was served over the old one is gone. A machine whose
	// process is gone is errdefs.ErrNotFound, the reason in the error.
	Adopt(ctx context.Context, id string) (Machine, error)
}

// ResumeSparer is a Runner that keeps machines started ahead of the next
// resume. Its user says when any are wanted (some box is hibernated) and
// drops them when none are.
type ResumeSparer interface {
	// SetResumeSparesWanted sets the function asked before a spare starts.
	SetResumeSparesWanted(wanted func() bool)
	// DropResumeSpares stops the spares waiting, and returns once they
	// have.
	DropResumeSpares()
	// WarmResume readies a spare for a resume from snapshot snap with
	// host ports hostPorts, in the background.
	WarmResume(snap string, hostPorts []uint16)
}
