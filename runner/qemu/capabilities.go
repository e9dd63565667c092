package qemu

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// CreateDisk makes path a new, empty qcow2 overlay over base (runner.DiskFiles).
func (r *Runner) CreateDisk(ctx context.Context, path, base string) error {
	return CreateOverlay(ctx, path, base)
}

// DiskChain lists the qcow2 chain of the disk at path, top first (runner.DiskFiles).
func (r *Runner) DiskChain(path string) []string { return BackingChain(path) }

// SnapshotDisk is the overlay snapshot s froze, "" if s has none (runner.DiskFiles).
func (r *Runner) SnapshotDisk(s snapshotter.Snapshot) string { return s.Labels[LabelDisk] }

// DiskOrigin is the disk a frozen overlay was made from (runner.DiskFiles):
// a snapshot freezes the top of DIR/ORIGIN (or of an overlay that took
// over from it) as DIR/ORIGIN@SNAPSHOT.qcow2 (see Machine.nextOverlay).
// Overlays of disks named NAME.qcow2 were once called NAME@SNAPSHOT.qcow2.
func (r *Runner) DiskOrigin(file string) string {
	base := filepath.Base(file)
	i := strings.Index(base, "@")
	if i <= 0 || !strings.HasSuffix(base, ".qcow2") {
		return ""
	}
	origin := base[:i]
	if filepath.Ext(origin) == "" {
		origin += ".qcow2"
	}
	return filepath.Join(filepath.Dir(file), origin)
}

// ReleaseSnapshot stops the spares still waiting for restores of snap and
// removes its frozen memory file once no machine maps it and it is in the
// store (runner.SnapshotReleaser).
func (r *Runner) ReleaseSnapshot(snap string) {
	r.dropSpares(snap)
	r.dropFrozen(snap)
}

// SnapshotRemoved removes the disk of snap exported for restores, and its
// frozen memory file if one is left (runner.SnapshotReleaser).
func (r *Runner) SnapshotRemoved(snap string) {
	r.dropFrozen(snap)
	_ = os.Remove(r.exportedDisk(snap))
}

// SnapshotSpec is the machine a QEMU snapshot restores as (runner.SpecReader).
func (r *Runner) SnapshotSpec(s snapshotter.Snapshot) (runner.Spec, error) {
	spec, err := r.machineSpec(s)
	if spec.Network == netSlirp {
		spec.Network = runner.NetworkUser
	}
	// A machine booted anew from it gets the new layout: only a device
	// state needs the old one.
	spec.Layout = ""
	return spec, err
}

// machineSpec is SnapshotSpec as Restore needs it: a snapshot taken on
// QEMU's own user network restores onto it (netSlirp).
func (r *Runner) machineSpec(s snapshotter.Snapshot) (runner.Spec, error) {
	if s.Labels[runner.LabelRunner] != r.Name() {
		return runner.Spec{}, fmt.Errorf("qemu: snapshot %q is not a QEMU machine's: %w", s.Name, errdefs.ErrInvalidArgument)
	}
	var st storedSpec
	if err := json.Unmarshal([]byte(s.Labels[LabelSpec]), &st); err != nil {
		return runner.Spec{}, fmt.Errorf("qemu: snapshot %q: machine spec: %w: %w", s.Name, err, errdefs.ErrDataLoss)
	}
	return st.spec(), nil
}

// storedSpec is a machine's spec as a snapshot's LabelSpec keeps it: the
// kernel and a map of settings. It is the form boxd has always written, so
// every snapshot ever taken restores.
type storedSpec struct {
	MemSize int64
	CPUs    int
	Boot    string
	Options map[string]string `json:",omitempty"`
}

// Keys of storedSpec.Options.
const (
	storedInitrd  = "initrd"
	storedCmdline = "cmdline"
	storedNet     = "net"
	// storedCPU is the machine's CPU model; a snapshot without it was
	// taken on LegacyCPU.
	storedCPU = "cpu"
	// storedLayout is the machine's layout; a snapshot without it was
	// taken on LegacyLayout.
	storedLayout = "layout"
)

// Values of Options[storedNet] besides the runner's networks: snapshots
// since boxes run on passt say so; one without it (or with "user") was
// taken on QEMU's own user network, netSlirp.
const storedPasst = "passt"

func toStored(s runner.Spec) storedSpec {
	st := storedSpec{MemSize: s.MemSize, CPUs: s.CPUs, Boot: s.Kernel, Options: map[string]string{}}
	net := s.Network
	if net == "" || net == runner.NetworkUser {
		net = storedPasst
	}
	for k, v := range map[string]string{storedInitrd: s.Initrd, storedCmdline: s.Cmdline, storedNet: net, storedCPU: s.CPUModel, storedLayout: s.Layout} {
		if v != "" {
			st.Options[k] = v
		}
	}
	return st
}

// spec is the Spec st keeps, without disk or console (a snapshot's label
// never held them).
func (st storedSpec) spec() runner.Spec {
	net := st.Options[storedNet]
	switch net {
	case storedPasst:
		net = ""
	case "", runner.NetworkUser:
		net = netSlirp
	}
	cpu := st.Options[storedCPU]
	if cpu == "" {
		cpu = LegacyCPU
	}
	return runner.Spec{
		MemSize: st.MemSize, CPUs: st.CPUs, Kernel: st.Boot,
		Initrd: st.Options[storedInitrd], Cmdline: st.Options[storedCmdline], Network: net,
		CPUModel: cpu, Layout: cmp.Or(st.Options[storedLayout], LegacyLayout),
	}
}
