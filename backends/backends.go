// Package backends builds the runner backends boxd ships, qemu and kvm,
// for one root, and hands them to the box manager: the box manager knows
// only package runner's interfaces.
package backends

import (
	"cmp"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/internal/netguard"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/kvm"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Default is the runner boxes run on unless they ask for another: QEMU,
// the one that boots Linux boxes on every host.
const Default = "qemu"

// HostLabels are the snapshot labels that name files of one host only (a
// frozen disk overlay): a snapshot read on another host goes without them.
var HostLabels = []string{qemu.LabelDisk}

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
	// EagerRestore makes QEMU restores rebuild a box's whole memory before
	// it runs instead of serving it lazily (qemu.Runner.EagerRestore).
	EagerRestore bool
	// LiveForks makes QEMU forks copy a box's memory live, with QEMU's
	// dirty tracking (qemu.Runner.LiveForks).
	LiveForks bool
	// LazyGrace is qemu.Runner.LazyGrace (0: its default).
	LazyGrace time.Duration
	// DiskLayers is qemu.Runner.DiskLayers (0: its default).
	DiskLayers int
}

// ResumeSpares is how many QEMUs wait, started, for the next lazy resume
// of each kind of box resumed lately (qemu.Runner.ResumeSpares).
const ResumeSpares = 1

// KVMPool is how many VMM processes the kvm runner keeps started, each with
// a VM of the memory size last run built ahead, once it has run a machine
// (kvm.Runner.Pool): a fork or resume takes one instead of starting a
// process (about 10 ms here). A waiting VMM holds its VM's memory
// registered, not filled: about 9 MiB resident here (4 MiB proportional)
// for a 256 MiB VM.
const KVMPool = 1

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
	table   string // the root's firewall table, "" when none was installed

	// guardMu guards rules, whose Allow are the machines with host ports.
	guardMu sync.Mutex
	rules   netguard.Rules
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
	hash := shortHash(cfg.Root)
	if cfg.MemDir == "" {
		cfg.MemDir = filepath.Join(shmDir, memDirPrefix+hash)
		if freed, n := reclaimMemDirs(shmDir, cfg.MemDir); n > 0 {
			log.Info("backends: removed the memory folders and firewall tables of boxd daemons that are gone", "folders", n, "mib", freed>>20)
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
		MemoryGroups: memDirPrefix + shortHash(cfg.Root), EagerRestore: cfg.EagerRestore, LiveForks: cfg.LiveForks,
		ResumeSpares: ResumeSpares, LazyGrace: cfg.LazyGrace, DiskLayers: cfg.DiskLayers,
	}
	set := &Set{QEMU: q, memDir: cfg.MemDir, log: log}
	set.guard(cfg.Root, hash, log)
	k := &kvm.Runner{Graph: cfg.Graph, Command: cfg.VMM, Pool: KVMPool}
	set.Runners, set.KVM = []runner.Runner{q, k}, k
	return set
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

// Boxes' networks: each root's machines run their network helper (passt)
// as a uid of the root's own range, which the root's firewall table
// (boxd_HASH, family inet) keeps off the host. Ranges and tables are per
// root so that daemons on different roots neither share nor remove each
// other's rules.
const (
	tablePrefix = "boxd_"
	netUIDBase  = 1 << 30 // the ranges lie above every uid a system hands out
	netUIDs     = 256     // uids per root
)

// netUIDRange is the first and last uid of the range of the root whose
// short hash is hash.
func netUIDRange(hash string) (first, last uint32) {
	b, _ := hex.DecodeString(hash)
	first = netUIDBase | uint32(b[0])<<16 | uint32(b[1])<<8
	return first, first + netUIDs - 1
}

// guardTimeout bounds each nft run.
const guardTimeout = 10 * time.Second

// guard installs the root's firewall table and tells the QEMU runner the
// uid its network helpers run as. Without the table, machines get no
// network: the runner refuses one with the reason.
func (s *Set) guard(root, hash string, log *slog.Logger) {
	first, last := netUIDRange(hash)
	s.QEMU.NetUID = first
	conf, _ := os.ReadFile("/etc/resolv.conf")
	ctx, cancel := context.WithTimeout(context.Background(), guardTimeout)
	defer cancel()
	rules := netguard.Rules{Table: tablePrefix + hash, FirstUID: first, LastUID: last, DNS: netguard.Resolvers(conf)}
	if err := netguard.Install(ctx, rules); err != nil {
		s.QEMU.NetErr = fmt.Errorf("the firewall that keeps boxes off the host is missing: %w", err)
		log.Error("backends: boxes will have no network", "root", root, "err", err)
		return
	}
	s.table, s.rules = rules.Table, rules
	s.QEMU.Expose = s.expose
}

// expose gives a machine with host ports a uid of the root's range of its
// own, and lets it reach ports on the host's loopback: the table is
// replaced with one that has the exception, and again without it on
// release.
func (s *Set) expose(ctx context.Context, ports []uint16) (uint32, func(), error) {
	s.guardMu.Lock()
	defer s.guardMu.Unlock()
	uid := s.rules.FirstUID + 1 // the first is every other machine's
	for _, a := range s.rules.Allow {
		if a.UID == uid {
			uid++
		}
	}
	if uid > s.rules.LastUID {
		return 0, nil, errcat.With(fmt.Errorf("%d machines with host ports already run on this root", netUIDs-1), errdefs.ErrResourceExhausted)
	}
	next := s.rules
	next.Allow = append(slices.Clone(s.rules.Allow), netguard.Allowance{UID: uid, Ports: slices.Clone(ports)})
	slices.SortFunc(next.Allow, func(a, b netguard.Allowance) int { return cmp.Compare(a.UID, b.UID) })
	if err := netguard.Install(ctx, next); err != nil {
		return 0, nil, err
	}
	s.rules = next
	release := func() {
		s.guardMu.Lock()
		defer s.guardMu.Unlock()
		next := s.rules
		next.Allow = slices.DeleteFunc(slices.Clone(s.rules.Allow), func(a netguard.Allowance) bool { return a.UID == uid })
		ctx, cancel := context.WithTimeout(context.Background(), guardTimeout)
		defer cancel()
		if err := netguard.Install(ctx, next); err != nil {
			// The uid stays taken: no other machine gets its ports.
			s.log.Error("backends: closing a machine's host ports", "uid", uid, "err", err)
			return
		}
		s.rules = next
	}
	return uid, release, nil
}

// Close waits for the lazy restores under way and the snapshots written in
// the background, stops the kvm runner's waiting VMM processes and removes
// the memory folder once it is empty (every machine has stopped).
func (s *Set) Close(ctx context.Context) error {
	s.QEMU.StopResumeSpares()
	err := s.QEMU.AwaitRestores(ctx)
	err = errors.Join(err, s.QEMU.Flush(ctx))
	_ = s.KVM.Close()
	if entries, rerr := os.ReadDir(s.memDir); rerr == nil && len(entries) == 1 && entries[0].Name() == ownerFile {
		_ = os.RemoveAll(s.memDir) // only the owner file is left: every machine has stopped
		if s.table != "" {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), guardTimeout)
			defer cancel()
			err = errors.Join(err, netguard.Remove(rctx, s.table))
		}
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
			ctx, cancel := context.WithTimeout(context.Background(), guardTimeout)
			_ = netguard.Remove(ctx, tablePrefix+strings.TrimPrefix(e.Name(), memDirPrefix))
			cancel()
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
