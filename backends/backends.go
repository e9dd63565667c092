// Package backends builds the runner backends boxd ships, qemu and kvm,
// for one root, and hands them to the box manager: the box manager knows
// only package runner's interfaces.
package backends

import (
	"context"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/kvm"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// Default is the runner boxes run on unless they ask for another: QEMU,
// the one that boots Linux boxes on every host.
const Default = "qemu"

// OOM-killer scores (oom_score_adj): when the host runs out of memory the
// kernel kills a box's QEMU before the daemon, which keeps every other box
// and notes why that one stopped.
const (
	DaemonOOMScoreAdj  = -500
	MachineOOMScoreAdj = 300
)

// Config says where the backends keep their files.
type Config struct {
	Root   string             // boxd's root: machines' folders go under ROOT/run
	Graph  *snapshotter.Graph // the store under Root
	Logger *slog.Logger
	// MemDir holds guest memory files; "" means a folder in /dev/shm
	// named for Root.
	MemDir string
	// VMM starts the kvm runner's VMM process: the boxd binary and its
	// hidden vmm command. Nil leaves the kvm runner unable to start
	// machines (it still answers Capabilities).
	VMM []string
}

// Set is the backends of one root.
type Set struct {
	// Runners are qemu and kvm, the default first.
	Runners []runner.Runner
	QEMU    *qemu.Runner
	KVM     *kvm.Runner
	memDir  string
}

// New builds the backends of cfg.Root. Memory files a boxd that is gone
// left in the memory folder are removed.
func New(cfg Config) *Set {
	if cfg.MemDir == "" {
		cfg.MemDir = filepath.Join("/dev/shm", "boxd-"+shortHash(cfg.Root))
	}
	_ = os.RemoveAll(cfg.MemDir)
	q := &qemu.Runner{
		Dir: filepath.Join(cfg.Root, "run"), MemDir: cfg.MemDir, Graph: cfg.Graph, Logger: cfg.Logger,
		OOMScoreAdj: MachineOOMScoreAdj,
	}
	k := &kvm.Runner{Graph: cfg.Graph, Command: cfg.VMM}
	return &Set{Runners: []runner.Runner{q, k}, QEMU: q, KVM: k, memDir: cfg.MemDir}
}

// Close waits for the snapshots written in the background, stops the kvm
// runner's waiting VMM processes and removes the memory folder once it is
// empty (every machine has stopped).
func (s *Set) Close(ctx context.Context) error {
	err := s.QEMU.Flush(ctx)
	_ = s.KVM.Close()
	_ = os.Remove(s.memDir)
	return err
}

// Offline is the backends without a root, for checking what they can do
// (capabilities) before asking a daemon for a box.
func Offline() []runner.Runner {
	return []runner.Runner{&qemu.Runner{}, &kvm.Runner{}}
}

func shortHash(s string) string {
	h := cas.Sum([]byte(s))
	return hex.EncodeToString(h[:6])
}
