package box

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// Usage is what one box uses of the host, measured at At. The figures of
// its machine are there while it has one (running or paused).
type Usage struct {
	Name   string    `json:"name"`
	State  string    `json:"state"`
	Runner string    `json:"runner"`
	At     time.Time `json:"at"`
	// CPUs and GuestMemory are the box's size: its vCPUs, and its
	// guest's memory in bytes.
	CPUs        int   `json:"cpus"`
	GuestMemory int64 `json:"guest_memory"`

	// Started is when the box's machine started (booted, resumed or
	// restored as a fork); zero when it has no machine.
	Started time.Time `json:"started,omitzero"`
	// CPUSeconds is the host CPU time (user and system) the machine has
	// used since Started; nil where its runner does not say
	// (runner.CPUMeter). A client's CPU share is the change of it
	// between two Usages over the change of At.
	CPUSeconds *float64 `json:"cpu_seconds,omitempty"`
	// HostMemory is the host memory the machine holds now; nil where its
	// runner does not say (runner.MemoryMeter).
	HostMemory *runner.MemoryUse `json:"host_memory,omitempty"`
	// Disk is the file the box writes its disk to; nil when it is gone.
	Disk *DiskUse `json:"disk,omitempty"`
	// Store is what the box's snapshots alone hold in the store: what
	// removing the box, then `boxd store gc`, frees of it. Measured only
	// when asked (UsageOptions.Store); snapshots still being written to
	// the store are not in it yet.
	Store *snapshotter.Exclusive `json:"store,omitempty"`
}

// DiskUse is the host's view of the writable top of a box's disk: what
// the box wrote since its last snapshot froze the layer below (a qcow2
// overlay on the QEMU runner).
type DiskUse struct {
	Path string `json:"path"`
	// Allocated is the bytes the file takes on the host's disk.
	Allocated int64 `json:"allocated"`
	// Size is the file's length, holes included.
	Size int64 `json:"size"`
}

// UsageOptions choose what Usage measures beyond the machine and disk
// figures.
type UsageOptions struct {
	// Store adds each box's Store: one pass over the snapshot graph
	// (snapshotter.Graph.ExclusiveByGroup) for all the boxes, kept until
	// the set of snapshots changes.
	Store bool
}

// usageState is what the manager keeps for Usage.
type usageState struct {
	// mu protects started.
	mu sync.Mutex
	// started is when each box's machine started, with the machine: a
	// box's entry counts while that machine is the box's.
	started map[string]machineStart

	// storeMu is held while the store figures are measured, so that
	// callers at once wait for one measurement; it protects the fields
	// below.
	storeMu sync.Mutex
	// storeKey names the set of snapshots byBox was measured on.
	storeKey [sha256.Size]byte
	byBox    map[string]snapshotter.Exclusive
}

type machineStart struct {
	mach runner.Machine
	at   time.Time
}

// noteStart records that mach, box name's new machine, started at at,
// forgetting the machines that have ended.
func (u *usageState) noteStart(name string, mach runner.Machine, at time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.started == nil {
		u.started = map[string]machineStart{}
	}
	for n, s := range u.started {
		select {
		case <-s.mach.Done():
			delete(u.started, n)
		default:
		}
	}
	u.started[name] = machineStart{mach, at}
}

// startOf is when mach, box name's machine, started; zero if unknown.
func (u *usageState) startOf(name string, mach runner.Machine) time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	if s, ok := u.started[name]; ok && s.mach == mach {
		return s.at
	}
	return time.Time{}
}

// Usage measures what boxes use of the host now: those named (an unknown
// name is ErrNotFound), or every box when none are, by name. It takes no
// box's lock: a box in the middle of an operation is measured as it is.
func (m *Manager) Usage(ctx context.Context, names []string, opts UsageOptions) ([]Usage, error) {
	var boxes []Box
	if len(names) == 0 {
		var err error
		if boxes, err = m.List(); err != nil {
			return nil, err
		}
	}
	for _, n := range names {
		bx, err := m.Get(n)
		if err != nil {
			return nil, err
		}
		boxes = append(boxes, bx)
	}
	var byBox map[string]snapshotter.Exclusive
	if opts.Store {
		var err error
		if byBox, err = m.storeUsage(ctx); err != nil {
			return nil, fmt.Errorf("store figures: %w", err)
		}
	}
	out := make([]Usage, 0, len(boxes))
	for _, bx := range boxes {
		u := m.machineUsage(bx)
		if opts.Store {
			e := byBox[bx.Name]
			u.Store = &e
		}
		out = append(out, u)
	}
	return out, nil
}

// machineUsage measures bx's machine, where it has one, and its disk.
func (m *Manager) machineUsage(bx Box) Usage {
	u := Usage{Name: bx.Name, State: bx.State, Runner: bx.Runner, CPUs: bx.CPUs, GuestMemory: bx.Memory}
	mach, _, ok := m.machine(bx.Name)
	u.At = time.Now()
	if ok {
		u.Started = m.usage.startOf(bx.Name, mach)
		if cm, ok := mach.(runner.CPUMeter); ok {
			if d, err := cm.CPUTime(); err == nil {
				s := d.Seconds()
				u.CPUSeconds = &s
			}
		}
		if mm, ok := mach.(runner.MemoryMeter); ok {
			if mu, err := mm.Memory(); err == nil {
				u.HostMemory = &mu
			}
		}
	}
	// The record's disk, not the machine's (runner.DiskMachine): that
	// waits for a snapshot in progress, and every snapshot of a running
	// box records the disk its machine goes on writing.
	if fi, err := os.Stat(bx.Disk); err == nil {
		d := &DiskUse{Path: bx.Disk, Size: fi.Size()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			d.Allocated = st.Blocks * 512
		}
		u.Disk = d
	}
	return u
}

// storeUsage is what each box's snapshots alone hold in the store, by box
// name, measured again only when the set of snapshots has changed
// (snapshots are immutable).
func (m *Manager) storeUsage(ctx context.Context) (map[string]snapshotter.Exclusive, error) {
	u := &m.usage
	u.storeMu.Lock()
	defer u.storeMu.Unlock()
	for try := 1; ; try++ {
		key, err := m.snapshotSet()
		if err != nil {
			return nil, err
		}
		if u.byBox != nil && u.storeKey == key {
			return u.byBox, nil
		}
		byBox, err := m.cfg.Graph.ExclusiveByGroup(ctx, snapshotBox)
		if err == nil {
			u.storeKey, u.byBox = key, byBox
			return byBox, nil
		}
		// A snapshot removed while they were measured (a box removed)
		// fails the measurement: measure again what is there now.
		if now, e := m.snapshotSet(); e != nil || now == key || try == 3 {
			return nil, err
		}
	}
}

// snapshotSet names the set of snapshots in the store now.
func (m *Manager) snapshotSet() ([sha256.Size]byte, error) {
	all, err := m.cfg.Graph.List()
	if err != nil {
		return [sha256.Size]byte{}, err
	}
	h := sha256.New()
	for _, s := range all {
		h.Write([]byte(s.Name))
		h.Write(binary.BigEndian.AppendUint64([]byte{0}, uint64(s.Created.UnixNano())))
	}
	return [sha256.Size]byte(h.Sum(nil)), nil
}

// snapshotBox is the box a snapshot belongs to: the one it is labelled
// for, else the one it is named after (box.NAME.SNAP); "" for none.
func snapshotBox(s snapshotter.Snapshot) string {
	if b := s.Labels[LabelBox]; b != "" {
		return b
	}
	rest, ok := strings.CutPrefix(s.Name, "box.")
	if !ok {
		return ""
	}
	name, _, ok := strings.Cut(rest, ".")
	if !ok {
		return ""
	}
	return name
}
