// Package qemu is the runner backend that boots Linux guests in QEMU, one
// qemu-system-x86_64 process per machine, driven over QMP. It uses KVM
// where the host CPU has hardware virtualisation (vmx or svm) and TCG
// elsewhere.
//
// A snapshot saves device state (migration with x-ignore-shared, guest RAM
// left out), the guest memory pages changed since the previous snapshot
// (found by page hashes) and the disk blocks written since (the frozen top
// of a qcow2 overlay chain). A restore maps a frozen memory file of the
// snapshot copy-on-write (share=off), so that forks share every page they
// only read, and loads the device state with -incoming. Machine.SnapshotForFork gives
// its snapshot such a file while the machine goes on, and writes the
// snapshot to the store in the background; Machine.StartSpares starts spare QEMUs
// that restores of that snapshot take instead of starting one.
//
// Spec.Kernel is the kernel image; Initrd, Cmdline, Console, Disk and
// Network are as runner.Spec says (Disk a qcow2 or raw file, as virtio-blk
// /dev/vda; Network a passt process per machine, kept off the host, by
// default: see net.go). The runner has every
// optional capability of package runner.
//
// Spec.MemSize must be a positive multiple of 1 MiB. Guest memory is a file
// (memory-backend-file, share=on) in Runner.MemDir, a tmpfs, so that a
// snapshot can read it and forks can map it (see memfile.go for the life
// of those files). Every machine has a virtio-serial port named AgentPort
// on a unix socket (Machine.AgentSocket) for the in-guest agent.
package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// AgentPort is the name of the virtio-serial port the guest agent serves on.
const AgentPort = "org.boxd.agent"

// Accelerators QEMU runs machines with.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

const mib = 1 << 20

// Runner starts QEMU machines.
type Runner struct {
	// Binary is the QEMU executable ("" means qemu-system-x86_64 on PATH).
	Binary string
	// Dir holds each machine's folder (console file, QMP socket); "" means
	// the system's temporary folder.
	Dir string
	// MemDir holds guest memory files; it should be a tmpfs. "" means
	// /dev/shm.
	MemDir string
	// Logger is told which accelerator each machine runs with (nil means
	// slog.Default()).
	Logger *slog.Logger

	// OOMScoreAdj is the oom_score_adj (-1000 to 1000) each QEMU gets, so
	// that the kernel's OOM killer takes a machine before the process that
	// runs them (which may protect itself with a lower one); 0 leaves QEMU
	// with what it inherits.
	OOMScoreAdj int

	// MemoryHeadroom, when positive, bounds each QEMU's host memory to its
	// guest's memory plus this much (QEMU's own code, translation cache
	// and buffers), in a memory cgroup of its own named after the machine
	// under MemoryGroups: past it the kernel reclaims the machine's page
	// cache, then ends QEMU. Where no memory cgroup can be made, machines
	// run unbounded and the Logger says so. 0 sets no bound.
	MemoryHeadroom int64
	// MemoryGroups is the folder of the machines' memory cgroups ("" means
	// "boxd").
	MemoryGroups string
	// Detached makes machines outlive the process that starts them, for
	// a later process to Adopt (boxd's daemon: its boxes survive its
	// crash or upgrade): QEMU runs in a session of its own, away from the
	// process's terminal and signals. Without it QEMU is killed when that
	// process ends (tests, tools), so nothing is left behind.
	Detached bool
	// Passt is the network helper each machine's network runs on ("" means
	// passt on PATH); see net.go.
	Passt string
	// NetUID is the uid (and gid) passt runs as; the host's firewall keeps
	// it off the host's own addresses. 0 leaves it to passt, which drops
	// to nobody when started by root.
	NetUID uint32
	// NetErr, when set, is why machines may have no network here (the
	// firewall that keeps NetUID off the host is missing): a machine that
	// asks for one is refused with it.
	NetErr error
	// Expose, when set, opens host ports to one machine: it returns the
	// uid whose passt may reach those TCP ports on the host's loopback and
	// a function that closes them again. Without it machines with
	// Spec.HostPorts are refused.
	Expose func(ctx context.Context, ports []uint16) (uid uint32, release func(), err error)

	// TCGCacheMiB bounds QEMU's translation cache under TCG (-accel
	// tcg,tb-size), in MiB: a machine fills it as its guest runs code, up
	// to this, so it is most of what a machine holds beyond its guest's
	// memory, once for each fork. 0 means DefaultTCGCacheMiB; KVM has no
	// such cache.
	TCGCacheMiB int

	// Graph is the store snapshots go to and come from.
	Graph *snapshotter.Graph
	// LiveForks makes a fork of a running machine copy its memory live,
	// with QEMU's dirty tracking (livecopy.go), where that pays: the guest
	// then stands stopped for the last pages and its device state only.
	// Off, a fork copies the memory file while the guest runs and, the
	// guest stopped, compares it (or saves the private RAM). It takes
	// effect only where QEMU's dirty tracking is sound: under KVM, or
	// QEMU 9.0 or later under TCG (liveTracked); elsewhere forks copy
	// files, and the runner says so once.
	LiveForks bool
	// EagerRestore makes a long-lived restore rebuild the whole memory
	// file before QEMU starts, as boxd did before lazy restores
	// (postcopy.go); it is there to compare the two.
	EagerRestore bool
	// ResumeSpares is how many QEMUs are kept started ahead of a lazy
	// restore for each kind of machine restored lately (resumespare.go);
	// 0 keeps none.
	ResumeSpares int
	// LazyGrace is how long after a lazily restored guest starts the
	// pages outside its working set wait before they are pushed. 0 means
	// none where the push places pages straight into guest RAM
	// (directRAM), else 500 ms: the guest's first faults meet an idle
	// migration stream meanwhile.
	LazyGrace time.Duration
	// DiskLayers bounds the qcow2 layers over a machine's base image
	// (flatten.go): past it, after a snapshot or a restore of the machine
	// (with one more allowed for a fork's child), QEMU copies the data of
	// the layers but the lowest into the machine's top in the background
	// and the chain becomes the top over the lowest layer over the base.
	// 0 means DefaultDiskLayers; negative, never.
	DiskLayers int
	// Unique, when set, is called for a machine restored with
	// RestoreOptions.Unique once it runs, to give the guest fresh entropy
	// (the guest agent's job: QEMU has no way to reseed a Linux guest's
	// random number generator on its own).
	Unique func(ctx context.Context, m *Machine) error

	ids       atomic.Int64
	accelOnce sync.Once
	liveOff   sync.Once // warns that LiveForks is set but live copies are unsound
	accel     string

	frozenMu sync.Mutex
	frozen   map[string]*frozenFile // by snapshot name
	byPath   map[string]*frozenFile
	pending  map[string]*pendingSnap // snapshots on their way to the store, by name
	// building are the frozen files being rebuilt from the store, by
	// snapshot name: one restore builds, the others wait (acquire).
	building map[string]*build
	builds   atomic.Int64 // frozen files rebuilt from the store, for tests
	// prepFiles are the memory files machines prepared for their forks
	// (StartSpares) that no fork has adopted or dropped yet.
	prepFiles map[string]bool

	spareMu sync.Mutex
	spares  map[string][]*Machine // by the memory file they map

	resumeMu     sync.Mutex
	resumeSpares []*Machine     // resumespare.go
	refilling    bool           // a refill runs
	refills      sync.WaitGroup // the refill that runs, for StopResumeSpares
	resumeClosed bool           // StopResumeSpares was called
	resumeWanted func() bool
	resumeGen    int // DropResumeSpares calls

	liveMu sync.Mutex
	live   map[string]*Machine // the machines that run, by folder (adopt.go)

	stubs stubKernels // stubkernel.go
}

// The runner and its machines have every optional capability.
var (
	_ runner.Runner           = (*Runner)(nil)
	_ runner.DiskFiles        = (*Runner)(nil)
	_ runner.BackgroundWriter = (*Runner)(nil)
	_ runner.SnapshotReleaser = (*Runner)(nil)
	_ runner.SpecReader       = (*Runner)(nil)
	_ runner.Machine          = (*Machine)(nil)
	_ runner.AgentHost        = (*Machine)(nil)
	_ runner.CPUMeter         = (*Machine)(nil)
	_ runner.MemoryMeter      = (*Machine)(nil)
	_ runner.DiskMachine      = (*Machine)(nil)
	_ runner.Forker           = (*Machine)(nil)
)

// Name is "qemu".
func (r *Runner) Name() string { return "qemu" }

// Accel is the accelerator machines run with: AccelKVM where /proc/cpuinfo
// shows vmx or svm and /dev/kvm exists, else AccelTCG.
func (r *Runner) Accel() string {
	r.accelOnce.Do(func() { r.accel = detectAccel() })
	return r.accel
}

func detectAccel() string {
	info, err := os.ReadFile("/proc/cpuinfo")
	if err != nil || !HasVirtFlag(info) {
		return AccelTCG
	}
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return AccelTCG
	}
	return AccelKVM
}

// HasVirtFlag says whether a cpuinfo text (/proc/cpuinfo) lists vmx or svm
// among its flags: hardware virtualisation.
func HasVirtFlag(cpuinfo []byte) bool {
	for line := range bytes.Lines(cpuinfo) {
		key, val, ok := bytes.Cut(line, []byte(":"))
		if !ok || string(bytes.TrimSpace(key)) != "flags" {
			continue
		}
		for _, f := range bytes.Fields(val) {
			if string(f) == "vmx" || string(f) == "svm" {
				return true
			}
		}
	}
	return false
}

// DefaultTCGCacheMiB is Runner.TCGCacheMiB's default: QEMU's own is 1 GiB,
// which a long-running guest fills a good part of, in every fork.
const DefaultTCGCacheMiB = 64

// accelArg is -accel's value: the accelerator, and under TCG the size of
// its translation cache.
func (r *Runner) accelArg() string {
	a := r.Accel()
	if a != AccelTCG {
		return a
	}
	size := r.TCGCacheMiB
	if size <= 0 {
		size = DefaultTCGCacheMiB
	}
	return a + ",tb-size=" + strconv.Itoa(size)
}

// Capabilities says the backend boots Linux guests and takes incremental
// snapshots.
func (r *Runner) Capabilities() runner.Capabilities {
	return runner.Capabilities{Linux: true, IncrementalSnapshots: true}
}

func (r *Runner) logger() *slog.Logger {
	if r.Logger != nil {
		return r.Logger
	}
	return slog.Default()
}

// args checks spec and returns QEMU's arguments, less the per-machine paths.
func (r *Runner) args(spec runner.Spec) ([]string, error) {
	if spec.MemSize <= 0 || spec.MemSize%mib != 0 {
		return nil, fmt.Errorf("qemu: memory size %d: want a positive multiple of 1 MiB: %w", spec.MemSize, errdefs.ErrInvalidArgument)
	}
	if spec.CPUs < 0 {
		return nil, fmt.Errorf("qemu: %d vCPUs: %w", spec.CPUs, errdefs.ErrInvalidArgument)
	}
	if spec.Kernel == "" {
		return nil, fmt.Errorf("qemu: no kernel (Spec.Kernel): %w", errdefs.ErrInvalidArgument)
	}
	if err := checkFile("kernel", spec.Kernel); err != nil {
		return nil, err
	}
	cpus := max(spec.CPUs, 1)
	model := cpuModel(spec)
	if !validCPUModel(model) {
		return nil, fmt.Errorf("qemu: CPU model %q: %w", model, errdefs.ErrInvalidArgument)
	}
	if _, ok := serialPorts[layout(spec)]; !ok {
		return nil, fmt.Errorf("qemu: unknown machine layout %q: %w", spec.Layout, errdefs.ErrInvalidArgument)
	}
	args := []string{
		"-accel", r.accelArg(),
		"-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
		"-m", strconv.FormatInt(spec.MemSize/mib, 10) + "M",
		"-smp", strconv.Itoa(cpus),
		"-cpu", model,
		"-kernel", spec.Kernel,
	}
	if spec.Initrd != "" {
		if err := checkFile("initrd", spec.Initrd); err != nil {
			return nil, err
		}
		args = append(args, "-initrd", spec.Initrd)
	}
	if spec.Cmdline != "" {
		args = append(args, "-append", spec.Cmdline)
	}
	if spec.Disk != nil && spec.Disk.Path != "" {
		disk := spec.Disk.Path
		if err := checkFile("disk", disk); err != nil {
			return nil, err
		}
		format, err := diskFormat(disk)
		if err != nil {
			return nil, err
		}
		args = append(args,
			"-drive", driveOpts(disk, format),
			"-device", "virtio-blk-pci,drive=disk0,addr="+slotDisk)
	}
	switch spec.Network {
	case "", runner.NetworkUser:
		args = append(args, netArgs()...)
	case netSlirp:
		args = append(args, slirpArgs()...)
	case runner.NetworkNone:
	default:
		return nil, fmt.Errorf("qemu: network %q: want %q or %q: %w", spec.Network, runner.NetworkUser, runner.NetworkNone, errdefs.ErrInvalidArgument)
	}
	return args, nil
}

// CPU models of machines (QEMU's -cpu, runner.Spec.CPUModel).
const (
	// NewCPU is a new machine's: QEMU's default x86-64 model with RDRAND,
	// which QEMU emulates under TCG from the host's random numbers. The
	// guest kernel (trusting the CPU's generator, as Debian's does) has its
	// random pool ready as it boots, so nothing in the guest waits for
	// entropy: on QEMU's bare default, the agent's first random bytes (its
	// host key) waited about a second of every cold boot for the pool.
	NewCPU = "qemu64,+rdrand"
	// LegacyCPU is QEMU's default, which machines ran before NewCPU: the
	// model of a snapshot whose spec names none, and of a machine adopted
	// from a boxd that recorded none.
	LegacyCPU = "qemu64"
)

// cpuModel is the CPU model a machine of spec runs.
func cpuModel(spec runner.Spec) string {
	if spec.CPUModel == "" {
		return NewCPU
	}
	return spec.CPUModel
}

// Layouts of machines (runner.Spec.Layout): what the agent's virtio-serial
// device offers the guest.
const (
	// NewLayout is a new machine's: the virtio-serial device has two ports
	// (port 0 is QEMU's, kept for a console; the agent's is port 1), so the
	// guest sets up 6 virtqueues. A restore reads every virtqueue's ring
	// from guest memory as it loads the device state, so each is a page a
	// lazy restore must serve before the vCPUs run.
	NewLayout = "serial2"
	// LegacyLayout is what machines ran before NewLayout: QEMU's default
	// of 31 ports, 64 virtqueues, one of which the agent uses. It is the
	// layout of a snapshot whose spec names none, and of a machine adopted
	// from a boxd that recorded none.
	LegacyLayout = "serial31"
)

// serialPorts is the virtio-serial device's max_ports in each layout.
var serialPorts = map[string]int{NewLayout: 2, LegacyLayout: 31}

// serialDevice is the -device of the virtio-serial device the agent's port
// is on, in spec's layout.
func serialDevice(spec runner.Spec) string {
	return fmt.Sprintf("virtio-serial-pci,id=vser0,addr=%s,max_ports=%d", slotSerial, serialPorts[layout(spec)])
}

// layout is the layout a machine of spec runs.
func layout(spec runner.Spec) string {
	if spec.Layout == "" {
		return NewLayout
	}
	return spec.Layout
}

// validCPUModel says whether s can be QEMU's -cpu: a model's name and its
// +feature and key=value options, nothing that could end the option.
func validCPUModel(s string) bool {
	if s == "" || len(s) > 256 {
		return false
	}
	for _, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune(",+-_=.", c)
		if !ok {
			return false
		}
	}
	return !strings.Contains(s, ",,")
}

// netSlirp is the Network of a machine restored from a snapshot taken
// before boxes ran on passt: its device state holds QEMU's own user network,
// which it keeps (a restore onto another network backend fails) until the
// box boots again. It never leaves this package: SnapshotSpec gives it only
// back to Restore.
const netSlirp = "slirp"

// slirpArgs are QEMU's network arguments for QEMU's own user network
// (slirp), which maps the gateway to the host's loopback: not isolated.
func slirpArgs() []string {
	return []string{"-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile=,addr=" + slotNet}
}

// hasNetwork says whether spec asks for a network on passt.
func hasNetwork(spec runner.Spec) bool {
	return spec.Network == "" || spec.Network == runner.NetworkUser
}

// PCI slots of the devices. They are fixed, not left to the order of the
// arguments, because device state is matched by PCI address and a spare
// (see StartSpares) starts without the disk it gets later.
const (
	slotDisk   = "0x2"
	slotNet    = "0x3"
	slotSerial = "0x4"
)

// driveOpts is the -drive (or drive_add) value of the machine's disk.
func driveOpts(disk, format string) string {
	return "file=" + escapeOpt(disk) + ",if=none,id=disk0,format=" + format + ",cache=writeback,discard=unmap"
}

// qcow2Magic starts every qcow2 image.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// diskFormat is "qcow2" for a qcow2 image and "raw" for anything else.
func diskFormat(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("qemu: disk: %w", err)
	}
	defer f.Close()
	head := make([]byte, len(qcow2Magic))
	if _, err := io.ReadFull(f, head); err == nil && bytes.Equal(head, qcow2Magic) {
		return "qcow2", nil
	}
	return "raw", nil
}

// escapeOpt doubles the commas of a value in a QEMU option list.
func escapeOpt(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func checkFile(what, path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("qemu: %s: %w: %w", what, err, errdefs.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("qemu: %s: %w", what, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("qemu: %s %s is not a regular file: %w", what, path, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Start boots a fresh machine: QEMU with the kernel, initrd and command
// line of spec, its serial console captured to a file. It returns once
// QMP answers; ctx bounds only the start-up.
func (r *Runner) Start(ctx context.Context, spec runner.Spec) (runner.Machine, error) {
	m, err := r.StartMachine(ctx, spec)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// StartMachine is Start returning the concrete *Machine.
func (r *Runner) StartMachine(ctx context.Context, spec runner.Spec) (*Machine, error) {
	m, err := r.launch(ctx, spec, launchOptions{})
	if err != nil {
		return nil, err
	}
	m.markReady()
	return m, nil
}

// launchOptions say how a machine's QEMU starts beyond its spec.
type launchOptions struct {
	// memFile is an existing memory file to map privately (share=off):
	// a frozen snapshot's memory. "" makes a fresh file the machine owns
	// and maps shared.
	memFile string
	// incoming starts QEMU paused, waiting for device state (-incoming defer).
	incoming bool
	// postcopy makes QEMU the destination of a postcopy migration whose
	// source is boxd (a lazy restore, postcopy.go), with x-ignore-shared
	// off until its memory is in place.
	postcopy bool
	// acquired says the machine holds a reference on memFile (acquire),
	// to release when it ends; a spare holds none until it is taken.
	acquired bool
	// ownFile is an existing memory file the machine owns and maps shared
	// (a restore's own copy of a snapshot's memory).
	ownFile string
}

func (r *Runner) launch(ctx context.Context, spec runner.Spec, lo launchOptions) (*Machine, error) {
	spec.CPUModel = cpuModel(spec) // what it runs, for its snapshots and spares
	spec.Layout = layout(spec)
	args, err := r.args(spec)
	if err != nil {
		return nil, err
	}
	bin := r.Binary
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, errcat.NotSupported("qemu: %s is missing (install the Debian package qemu-system-x86): %w", bin, err)
	}
	id := fmt.Sprintf("qemu-%d-%d", os.Getpid(), r.ids.Add(1))
	if r.Dir != "" {
		if err := os.MkdirAll(r.Dir, 0o700); err != nil {
			return nil, fmt.Errorf("qemu: %w", err)
		}
	}
	dir, err := os.MkdirTemp(r.dirOrTemp(), id+"-")
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	memDir := r.memDir()
	if err := os.MkdirAll(memDir, 0o700); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("qemu: memory folder: %w", err)
	}
	m := &Machine{
		r:       r,
		spec:    spec,
		id:      id,
		accel:   r.Accel(),
		dir:     dir,
		console: filepath.Join(dir, "console"),
		socket:  filepath.Join(dir, "qmp.sock"),
		agent:   filepath.Join(dir, "agent.sock"),
		memFile: filepath.Join(memDir, filepath.Base(dir)+".mem"),
		disk:    diskPath(spec),
		base:    diskBase(spec),
		done:    make(chan struct{}),
		pidfd:   -1,
	}
	share := "on"
	m.released.Store(true) // until launch succeeds
	switch {
	case lo.memFile != "":
		m.memFile, m.private, share = lo.memFile, true, "off"
		m.acquired.Store(lo.acquired)
	case lo.ownFile != "":
		m.memFile = lo.ownFile
	}
	if spec.Console != "" {
		m.console = spec.Console
	}
	args = append(args,
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", spec.MemSize/mib, escapeOpt(m.memFile), share),
		"-machine", "pc,memory-backend=mem",
		"-device", serialDevice(spec),
		"-chardev", "socket,id=agent,path="+escapeOpt(m.agent)+",server=on,wait=off",
		"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+AgentPort,
		"-chardev", "file,id=console,path="+escapeOpt(m.console)+",append=on",
		"-serial", "chardev:console",
		"-qmp", "unix:"+m.socket+",server=on,wait=off",
	)
	if lo.incoming {
		args = append(args, "-S", "-incoming", "defer")
		if i := slices.Index(args, "-kernel"); i >= 0 {
			args[i+1] = r.restoreKernel(spec.Kernel)
		}
	}
	// QEMU writes what it says to a file in its folder, not to a pipe
	// that would break if it outlives this process (Detached, adopt.go).
	out, err := os.OpenFile(m.outputPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("qemu: %w", err)
	}
	m.cmd = exec.Command(path, args...)
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if r.Detached {
		m.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	m.cmd.Stdout, m.cmd.Stderr = out, out
	if hasNetwork(spec) {
		if m.net, err = r.startNet(ctx, id, spec.HostPorts, out); err != nil {
			_ = out.Close()
			_ = os.RemoveAll(dir)
			return nil, err
		}
		m.cmd.ExtraFiles = []*os.File{m.net.qemu}
	}
	r.logger().Debug("qemu: starting machine", "id", id, "accel", m.accel, "kernel", spec.Kernel, "mem_mib", spec.MemSize/mib, "incoming", lo.incoming)
	err = m.cmd.Start()
	_ = out.Close()
	m.net.started()
	if err != nil {
		m.net.stop()
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("qemu: %s: %w", id, err)
	}
	m.pid = m.cmd.Process.Pid
	m.started = monotonicNow()
	m.startTicks, _ = procstat.StartTime(m.pid)
	r.track(m)
	if err := m.saveState(); err != nil {
		r.logger().Warn("qemu: a later boxd cannot adopt this machine", "id", id, "err", err)
	}
	go m.wait()
	if r.OOMScoreAdj != 0 {
		if err := procstat.SetOOMScoreAdj(m.cmd.Process.Pid, r.OOMScoreAdj); err != nil {
			r.logger().Warn("qemu: the OOM killer may pick boxd before this machine", "id", id, "err", err)
		}
	}
	if r.MemoryHeadroom > 0 {
		limit := spec.MemSize + r.MemoryHeadroom
		if dir, err := r.memoryGroups().Bound(id, m.cmd.Process.Pid, limit); err != nil {
			r.logger().Warn("qemu: this machine's host memory is not bounded", "id", id, "err", err)
		} else {
			m.memcg.Store(&dir)
			m.memLimit = limit
		}
	}
	if err := m.connect(ctx); err != nil {
		m.kill()
		<-m.done
		return nil, fmt.Errorf("qemu: %s (%s): %w; QEMU said: %s", id, m.accel, err, m.said())
	}
	caps := []map[string]any{{"capability": "x-ignore-shared", "state": true}}
	if lo.postcopy {
		caps = []map[string]any{{"capability": "postcopy-ram", "state": true}}
		m.restored = make(chan struct{})
	}
	if _, err := m.qmp.execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}); err != nil {
		m.kill()
		<-m.done
		return nil, fmt.Errorf("qemu: %s: %w", id, err)
	}
	// Migration goes to boxd over a unix socket, not a network: QEMU's
	// default cap of 32 MiB/s would make a machine on a private mapping,
	// which sends its RAM, take seconds to save.
	if _, err := m.qmp.execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}); err != nil {
		m.kill()
		<-m.done
		return nil, fmt.Errorf("qemu: %s: %w", id, err)
	}
	// From here the machine gives back the caller's reference on its
	// memory file when it ends; on the failures above the caller does.
	m.released.Store(false)
	if m.stopped() && m.acquired.Load() && m.released.CompareAndSwap(false, true) {
		r.release(m.memFile) // it ended before its exit could see that
	}
	return m, nil
}

// diskPath is the file of spec's disk, "" for none.
func diskPath(spec runner.Spec) string {
	if spec.Disk == nil {
		return ""
	}
	return spec.Disk.Path
}

// diskBase is the snapshot spec's disk starts from, "" for none.
func diskBase(spec runner.Spec) string {
	if spec.Disk == nil {
		return ""
	}
	return spec.Disk.Base
}

func (r *Runner) memDir() string {
	if r.MemDir == "" {
		return "/dev/shm"
	}
	return r.MemDir
}

// connect dials the QMP socket until QEMU answers, the process exits or
// ctx ends.
func (m *Machine) connect(ctx context.Context) error {
	for {
		q, err := dialQMP(ctx, m.socket)
		if err == nil {
			m.qmpMu.Lock()
			m.qmp = q
			m.qmpMu.Unlock()
			return nil
		}
		select {
		case <-m.done:
			return fmt.Errorf("QEMU exited before QMP answered: %w", m.exit)
		case <-ctx.Done():
			return fmt.Errorf("waiting for QMP: %w (last: %w)", ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// outputPath is the file QEMU's own output (its error messages) goes to.
func (m *Machine) outputPath() string { return filepath.Join(m.dir, "output") }

// said is what QEMU printed, less the lines it prints for every disk
// snapshot ("Formatting '...'"): its error messages.
func (m *Machine) said() string {
	var out []byte
	if m.stopped() {
		out = m.finalOutput // set before done closed
	} else {
		out, _ = os.ReadFile(m.outputPath())
	}
	var keep [][]byte
	for line := range bytes.Lines(out) {
		if !bytes.HasPrefix(line, []byte("Formatting '")) {
			keep = append(keep, bytes.TrimRight(line, "\r\n"))
		}
	}
	return string(bytes.TrimSpace(bytes.Join(keep, []byte("; "))))
}

// Machine is one QEMU process.
type Machine struct {
	r    *Runner
	spec runner.Spec
	// memcg is the memory cgroup that bounds QEMU (see
	// Runner.MemoryHeadroom), memLimit its limit.
	memcg    atomic.Pointer[string]
	memLimit int64
	// liveForks counts the forks that copied the memory live (livecopy.go).
	liveForks atomic.Int64
	id        string
	accel     string
	dir       string
	console   string
	socket    string
	agent     string
	memFile   string
	private   bool // memFile is a frozen snapshot's, mapped copy-on-write
	disk      string
	base      string        // the snapshot the disk starts from (Spec.Disk.Base)
	started   time.Duration // CLOCK_MONOTONIC when QEMU started

	consoleMu sync.Mutex // guards console, which a spare's takeover changes

	acquired atomic.Bool // the machine holds a reference on memFile
	released atomic.Bool // and gave it back

	prepMu    sync.Mutex
	prepared  string         // the memory file the next SnapshotForFork fills, which spares map (StartSpares)
	prepEnded bool           // the machine ended: no other is made
	prepState map[string]int // prepared files forks took: prepForking, prepAdopted, prepFailed
	cmd       *exec.Cmd
	net       *netHelper  // the machine's network; nil for none
	frozen    atomic.Bool // memFile became a frozen snapshot's (Freeze)

	snapMu sync.Mutex // one snapshot at a time
	last   string     // the machine's previous snapshot
	sums   *pageSums  // what each page held at the last snapshot
	// unstoredDisks are overlays that snapshots which then failed froze:
	// the next snapshot stores their blocks too.
	unstoredDisks []string
	// flattening says a job that streams the disk's layers into its top
	// may run in QEMU (flatten.go); snapMu guards it.
	flattening bool

	ownDisk       atomic.Pointer[string] // a restore's disk overlay, removed at exit
	pendingUnique bool                   // reseed the guest when it next runs

	pid        int
	startTicks uint64 // when the process started (procstat.StartTime), 0 if unknown
	// pidfd tells an adopted machine's exit (its QEMU is not boxd's
	// child); -1 for a machine this runner started.
	pidfd int
	// ready says the machine was handed to its caller (not a spare, not a
	// restore half-way): only such a machine is adopted.
	ready bool

	finalOutput []byte     // QEMU's output at exit, set before done closes
	qmpMu       sync.Mutex // guards qmp's writing (connect) against wait's closing
	qmp         *qmp       // set before Start returns

	// lazy serves the memory of a machine restored lazily (postcopy.go)
	// until restored closes; nil for any other machine.
	lazy     atomic.Pointer[lazyMemory]
	restored chan struct{}
	// listening says QEMU listens for its restore's migration already (a
	// resume spare).
	listening bool
	// failCause is why boxd killed the machine, its exit error.
	failCause atomic.Pointer[error]

	stopping atomic.Bool
	done     chan struct{}
	exit     error  // set before done closes
	final    []byte // the console at exit, set before done closes
}

var _ runner.Machine = (*Machine)(nil)

// wait reaps QEMU, keeps its console and frees its folder.
func (m *Machine) wait() {
	err := m.cmd.Wait()
	m.net.stop()
	l := m.lazy.Load()
	switch {
	case m.failCause.Load() != nil:
		err = *m.failCause.Load()
	case m.stopping.Load():
		err = runner.ErrStopped
	case l != nil && !isClosed(m.restored):
		err = fmt.Errorf("qemu: QEMU exited while its memory was being restored from snapshot %q: %w (%w)", l.snap, err, runner.ErrMemoryNotRestored)
		if said := m.said(); said != "" {
			err = fmt.Errorf("%w: %s", err, said)
		}
	case err == nil:
		err = errors.New("qemu: guest powered off")
	case killedBySignal(err) && m.memcg.Load() != nil && oomKilled(m.pid, m.started) == oomCgroup:
		err = fmt.Errorf("qemu: the kernel's OOM killer ended QEMU: its memory cgroup was full (boxd bounds a machine to %d MiB of host memory: its guest's memory and %d MiB for QEMU): %w", m.memLimit>>20, (m.memLimit-m.spec.MemSize)>>20, err)
	case killedBySignal(err) && oomKilled(m.pid, m.started) != oomNone:
		err = fmt.Errorf("qemu: the kernel's OOM killer ended QEMU (the host ran out of memory): %w", err)
	default:
		err = fmt.Errorf("qemu: QEMU exited: %w", err)
		if said := m.said(); said != "" {
			err = fmt.Errorf("%w: %s", err, said)
		}
	}
	m.exited(err)
}

// exited frees what the machine held once its QEMU is gone, err saying
// why it went.
func (m *Machine) exited(err error) {
	m.finalOutput, _ = os.ReadFile(m.outputPath())
	m.final, _ = os.ReadFile(m.consolePath())
	if d := m.ownDisk.Load(); d != nil {
		_ = os.Remove(*d)
	}
	m.dropPrepared()
	switch {
	case m.private:
		m.r.forgetSpare(m)
		if m.acquired.Load() {
			if m.released.CompareAndSwap(false, true) {
				m.r.release(m.memFile)
			}
		} else {
			m.r.removeUnused(m.memFile)
		}
	case !m.frozen.Load():
		// Spares of a machine that ends without a freeze have nothing to
		// take over.
		m.r.stopSpares(m.memFile)
		_ = os.Remove(m.memFile)
	}
	m.qmpMu.Lock()
	if m.qmp != nil {
		_ = m.qmp.close()
	}
	m.qmpMu.Unlock()
	_ = os.RemoveAll(m.dir)
	if dir := m.memcg.Load(); dir != nil {
		_ = procstat.Remove(*dir)
	}
	m.r.untrack(m)
	m.exit = err
	close(m.done)
}

// memoryGroups is where the machines' memory cgroups go.
func (r *Runner) memoryGroups() procstat.MemoryGroups {
	if r.MemoryGroups == "" {
		return procstat.MemoryGroups{Parent: "boxd"}
	}
	return procstat.MemoryGroups{Parent: r.MemoryGroups}
}

// RemoveEmptyMemoryGroups removes the machines' memory cgroups that no
// process is left in (a killed boxd's), and says how many.
func (r *Runner) RemoveEmptyMemoryGroups() int { return r.memoryGroups().RemoveEmpty() }

// ID names the machine.
func (m *Machine) ID() string { return m.id }

// Accel is the accelerator the machine runs with.
func (m *Machine) Accel() string { return m.accel }

// AgentSocket is the unix socket of the guest agent's virtio-serial port.
func (m *Machine) AgentSocket() string { return m.agent }

// Disk is the machine's current disk file: after a snapshot, the overlay
// that took over its writes.
func (m *Machine) Disk() string {
	m.snapMu.Lock()
	defer m.snapMu.Unlock()
	return m.disk
}

// MemoryFile is the file that holds guest memory while QEMU runs.
func (m *Machine) MemoryFile() string { return m.memFile }

// OwnsMemory says whether the machine's memory file is its own, mapped shared (see memfile.go): Freeze then makes
// that very file the snapshot's, copying nothing.
func (m *Machine) OwnsMemory() bool { return !m.private }

// PID is the QEMU process's.
func (m *Machine) PID() int { return m.pid }

// CPUTime is the CPU time (user and system) QEMU has used so far.
func (m *Machine) CPUTime() (time.Duration, error) {
	if m.stopped() {
		return 0, m.exit
	}
	return procstat.CPUTime(m.PID())
}

// Memory is the host memory QEMU holds now (runner.MemoryMeter).
func (m *Machine) Memory() (runner.MemoryUse, error) {
	if m.stopped() {
		return runner.MemoryUse{}, m.exit
	}
	r, err := procstat.MemoryRollup(m.PID())
	if err != nil {
		return runner.MemoryUse{}, err
	}
	return runner.MemoryUse{RSS: r.RSS, PSS: r.PSS}, nil
}

func (m *Machine) stopped() bool {
	select {
	case <-m.done:
		return true
	default:
		return false
	}
}

func (m *Machine) command(ctx context.Context, name string) error {
	if m.stopped() {
		return m.exit
	}
	if _, err := m.qmp.execute(ctx, name, nil); err != nil {
		if m.stopped() {
			return m.exit
		}
		return fmt.Errorf("qemu: %s: %w", m.id, err)
	}
	return nil
}

// Pause stops the vCPUs (QMP stop).
func (m *Machine) Pause(ctx context.Context) error { return m.command(ctx, "stop") }

// Continue lets them run on (QMP cont). A machine restored with
// RestoreOptions.Unique is reseeded (Runner.Unique) on its first Continue.
func (m *Machine) Continue(ctx context.Context) error {
	if err := m.command(ctx, "cont"); err != nil {
		return err
	}
	if !m.pendingUnique {
		return nil
	}
	if m.r.Unique == nil {
		return errNoUnique
	}
	if err := m.r.Unique(ctx, m); err != nil {
		return fmt.Errorf("qemu: %s: reseeding the guest: %w", m.id, err)
	}
	m.pendingUnique = false
	return nil
}

// Status is QEMU's run state (QMP query-status): "running", "paused", ...
func (m *Machine) Status(ctx context.Context) (string, error) {
	if m.stopped() {
		return "", m.exit
	}
	raw, err := m.qmp.execute(ctx, "query-status", nil)
	if err != nil {
		return "", fmt.Errorf("qemu: %s: %w", m.id, err)
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return "", fmt.Errorf("qemu: %s: query-status: %w", m.id, err)
	}
	return st.Status, nil
}

// quitGrace is how long Stop waits after QMP quit before killing QEMU.
const quitGrace = 5 * time.Second

// Stop asks QEMU to quit, kills it if it has not within a few seconds (or
// when ctx ends), and waits for it to exit. It may be called more than
// once.
func (m *Machine) Stop(ctx context.Context) error {
	if m.stopped() {
		return nil
	}
	m.stopping.Store(true)
	if l := m.lazy.Load(); l != nil && !isClosed(m.restored) {
		// Its vCPUs may wait on pages: quit would wait for them.
		l.stop()
		m.kill()
		<-m.done
		return nil
	}
	qctx, cancel := context.WithTimeout(ctx, quitGrace)
	defer cancel()
	_, _ = m.qmp.execute(qctx, "quit", nil) // QEMU may close the socket before it answers
	select {
	case <-m.done:
		return nil
	case <-qctx.Done():
	}
	m.kill()
	<-m.done
	return nil
}

func (m *Machine) kill() {
	switch {
	case m.cmd != nil && m.cmd.Process != nil:
		_ = m.cmd.Process.Kill()
	case m.pidfd >= 0:
		_ = unix.PidfdSendSignal(m.pidfd, unix.SIGKILL, nil, 0)
	}
}

func (m *Machine) consolePath() string {
	m.consoleMu.Lock()
	defer m.consoleMu.Unlock()
	return m.console
}

// Done is closed when QEMU has exited.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Err says why QEMU exited (nil while it runs): runner.ErrStopped after Stop.
func (m *Machine) Err() error {
	if !m.stopped() {
		return nil
	}
	return m.exit
}

// Console returns the serial console's output so far.
func (m *Machine) Console() []byte {
	if m.stopped() {
		return m.final
	}
	b, _ := os.ReadFile(m.consolePath())
	if m.stopped() { // the folder may have gone while reading
		return m.final
	}
	return b
}

// isClosed says whether ch (nil: never made) is closed.
func isClosed(ch chan struct{}) bool {
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
