// Package backends builds the runner backends boxd ships, qemu and kvm,
// for one root, and hands them to the box manager: the box manager knows
// only package runner's interfaces.
package backends

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"

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
	// Detached makes QEMU machines outlive the process (qemu.Runner's
	// Detached): the daemon's boxes run on when it is killed, for the
	// next daemon to adopt. Without it they die with the process.
	Detached bool
	// VMM starts the kvm runner's VMM process: the boxd binary and its
	// hidden vmm command. Nil leaves the kvm runner unable to start
	// machines (it still answers Capabilities).
	VMM []string
	// MemoryHeadroom bounds each QEMU's host memory to its guest's memory
	// plus this much (qemu.Runner.MemoryHeadroom); 0 means
	// DefaultMemoryHeadroom, negative no bound.
	MemoryHeadroom int64
}

// DefaultMemoryHeadroom is the host memory a QEMU may use beyond its
// guest's: its code, TCG's translation cache, device and migration
// buffers. A booted 512 MiB box under TCG holds about 240 MiB in all.
const DefaultMemoryHeadroom = 256 << 20

// Set is the backends of one root.
type Set struct {
	// Runners are qemu and kvm, the default first.
	Runners []runner.Runner
	QEMU    *qemu.Runner
	KVM     *kvm.Runner
	memDir  string
	log     *slog.Logger
}

// New builds the backends of cfg.Root and removes the memory folders in
// /dev/shm of other roots whose daemon is gone. The caller holds the root
// (its store is open): what a previous boxd on it left (machines that may
// still run, their memory files and folders) is its to adopt (the box
// manager does, runner.Adopter) and then to Reclaim.
func New(cfg Config) *Set {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.MemDir == "" {
		cfg.MemDir = filepath.Join(shmDir, memDirPrefix+shortHash(cfg.Root))
		if freed, n := reclaimMemDirs(shmDir, cfg.MemDir); n > 0 {
			log.Info("backends: removed the memory folders of boxd daemons that are gone", "folders", n, "mib", freed>>20)
		}
	}
	if err := os.MkdirAll(cfg.MemDir, 0o700); err == nil {
		_ = os.WriteFile(filepath.Join(cfg.MemDir, ownerFile), fmt.Appendf(nil, "%d %s\n", os.Getpid(), cfg.Root), 0o600)
	}
	headroom := cfg.MemoryHeadroom
	switch {
	case headroom == 0:
		headroom = DefaultMemoryHeadroom
	case headroom < 0:
		headroom = 0
	}
	q := &qemu.Runner{
		Dir: filepath.Join(cfg.Root, "run"), MemDir: cfg.MemDir, Graph: cfg.Graph, Logger: cfg.Logger,
		OOMScoreAdj: MachineOOMScoreAdj, Detached: cfg.Detached, MemoryHeadroom: headroom,
		MemoryGroups: memDirPrefix + shortHash(cfg.Root),
	}
	k := &kvm.Runner{Graph: cfg.Graph, Command: cfg.VMM}
	return &Set{Runners: []runner.Runner{q, k}, QEMU: q, KVM: k, memDir: cfg.MemDir, log: log}
}

// Reclaim stops and removes what a previous boxd on the root left that was
// not adopted since New: its machines (spares, machines no box claimed),
// their folders under ROOT/run and memory files nothing maps. Exported
// disks beside the folders stay: disks stand on them. What was reclaimed
// is logged.
func (s *Set) Reclaim() {
	folders, freed := s.QEMU.Reclaim()
	if folders > 0 || freed > 0 {
		s.log.Info("backends: removed the machines and memory files a previous boxd left on this root", "folders", folders, "mib", freed>>20)
	}
	// Adopted machines keep theirs: a cgroup with a process stays.
	if n := s.QEMU.RemoveEmptyMemoryGroups(); n > 0 {
		s.log.Info("backends: removed the memory cgroups of machines a previous boxd left", "cgroups", n)
	}
}

// Close waits for the snapshots written in the background, stops the kvm
// runner's waiting VMM processes and removes the memory folder once it is
// empty (every machine has stopped).
func (s *Set) Close(ctx context.Context) error {
	err := s.QEMU.Flush(ctx)
	_ = s.KVM.Close()
	if entries, rerr := os.ReadDir(s.memDir); rerr == nil && len(entries) == 1 && entries[0].Name() == ownerFile {
		_ = os.RemoveAll(s.memDir) // only the owner file is left: every machine has stopped
	}
	return err
}

// Offline is the backends without a root, for checking what they can do
// (capabilities) before asking a daemon for a box.
func Offline() []runner.Runner {
	return []runner.Runner{&qemu.Runner{}, &kvm.Runner{}}
}

// Memory folders: /dev/shm/boxd-HASH, HASH from the root, each with an
// owner file that names the daemon's pid and root.
const (
	shmDir       = "/dev/shm"
	memDirPrefix = "boxd-"
	ownerFile    = "owner"
)

// reclaimMemDirs removes the memory folders in parent (but keep) whose
// owner file names a process that no longer exists, and returns the bytes
// and folders it freed. A folder without an owner file, whose owner
// lives, or whose root has machines that still run (a killed daemon's,
// for the next daemon on that root to adopt) is left alone.
func reclaimMemDirs(parent, keep string) (freed int64, folders int) {
	entries, err := os.ReadDir(parent)
	if err != nil {
		return 0, 0
	}
	for _, e := range entries {
		dir := filepath.Join(parent, e.Name())
		if !e.IsDir() || !strings.HasPrefix(e.Name(), memDirPrefix) || dir == keep {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(string(b), "%d", &pid); err != nil || pid <= 0 || alive(pid) {
			continue
		}
		if f := strings.Fields(string(b)); len(f) == 2 && qemu.LiveMachines(filepath.Join(f[1], "run")) > 0 {
			continue
		}
		size := treeSize(dir)
		if os.RemoveAll(dir) == nil {
			freed += size
			folders++
		}
	}
	return freed, folders
}

// alive says whether process pid exists.
func alive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// treeSize is the bytes the files under dir take (their blocks: memory
// files are sparse).
func treeSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

func shortHash(s string) string {
	h := cas.Sum([]byte(s))
	return hex.EncodeToString(h[:6])
}
