package kvm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// StateMap is the name of the snapshot map that holds a machine's vCPU state.
const StateMap = "machine"

// Runner runs machines on /dev/kvm, one VMM process each. It owns the
// graph: it captures memory (reading the VMM's memory with
// process_vm_readv) and serves restored machines' page faults.
type Runner struct {
	Graph *snapshotter.Graph
	// Command starts a VMM process: the boxd binary and "vmm". The VMM
	// talks on descriptor 3.
	Command []string
	// Env is added to the VMM's environment.
	Env []string
	// Dir holds the machines' console files.
	Dir string
	// Memory tunes lazy restores (fault-around, prefetch batch).
	Memory memstore.Options

	// Pool is how many VMM processes the runner keeps started and waiting,
	// so that Start and Restore skip process start-up (0: none). Each
	// prepares a VM of the memory size last asked for, which a Restore of
	// that size takes as it is.
	Pool int

	ids atomic.Int64
	// expect is the params of the latest machine started or restored:
	// pooled VMM processes prepare a machine like it.
	expect atomic.Pointer[Params]
	// poolMu protects the warm pool.
	poolMu    sync.Mutex
	pool      []*Machine
	refilling bool
	closed    bool
	// step, when set, is told as Restore and Snapshot finish each step
	// (the step names below), for benchmarks that show where time goes.
	step func(name string)

	// pendMu protects pending: the fork snapshots on their way to the
	// store (pending.go).
	pendMu  sync.Mutex
	pending map[string]*pendingSnap
	// writers are the background writes of pending snapshots.
	writers sync.WaitGroup
	// restoring counts the restores in progress, and lastRestore is when
	// the latest ended (CLOCK_MONOTONIC): background writes wait for
	// quiet (waitQuiet).
	restoring   atomic.Int32
	lastRestore atomic.Int64
	tablesOnce  sync.Once
	tables      *memstore.Tables
	// beforeCommit, when set, runs before each write of a pending
	// snapshot, and its error fails that write (tests inject failures).
	beforeCommit func(name string) error
}

// Steps of Restore and Snapshot, as told to Runner.step.
const (
	stepSpawned  = "spawned"  // Restore: the VMM process started
	stepRestored = "restored" // Restore: the VMM set up the VM and vCPU state, and sent the userfaultfd
	stepServing  = "serving"  // Restore: the page-fault server runs
	stepState    = "state"    // Snapshot: the vCPU paused and its state saved
	stepDirty    = "dirty"    // Snapshot: the dirty log read
	stepCaptured = "captured" // Snapshot: memory and state committed to the store; SnapshotForFork: the dirty pages copied to host memory
)

func (r *Runner) tell(step string) {
	if r.step != nil {
		r.step(step)
	}
}

// pageTables keeps the page tables of the snapshots restored lately and of
// the forks derived from them, so that a restore of either skips
// resolving its memory map.
func (r *Runner) pageTables() *memstore.Tables {
	r.tablesOnce.Do(func() { r.tables = memstore.NewTables(keptTablePages) })
	return r.tables
}

// keptTablePages bounds the kept page tables: 2 GiB of guest memory, about
// 28 MiB of tables.
const keptTablePages = 1 << 19

// Name implements runner.Runner.
func (r *Runner) Name() string { return "kvm" }

// Capabilities implements runner.Runner. The runner boots only its own
// test guest: Linux guests need hardware virtualisation and a boot path
// the runner does not have yet.
func (r *Runner) Capabilities() runner.Capabilities {
	c := runner.Capabilities{LazyMemory: true, IncrementalSnapshots: true}
	if HasHardwareVirt() {
		c.NoLinux = "the kvm runner boots only its own test guest so far"
	} else {
		c.NoLinux = "the CPU lacks hardware virtualisation (no vmx or svm flag in /proc/cpuinfo)"
	}
	return c
}

// HasHardwareVirt reports whether the CPU shows vmx or svm.
func HasHardwareVirt() bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, flag := range [][]byte{[]byte(" vmx"), []byte(" svm")} {
		if containsWord(b, flag) {
			return true
		}
	}
	return false
}

func containsWord(b, w []byte) bool {
	for i := 0; i+len(w) <= len(b); i++ {
		if string(b[i:i+len(w)]) == string(w) && (i+len(w) == len(b) || b[i+len(w)] == ' ' || b[i+len(w)] == '\n') {
			return true
		}
	}
	return false
}

// paramsOf reads the test guest's settings from spec.Cmdline, a
// space-separated list of key=number: pages_per_tick, seed, print_every,
// tick_rate (see Params). Initrd, disks and networks are refused.
func paramsOf(spec runner.Spec) (Params, error) {
	p := Params{MemSize: spec.MemSize, PagesPerTick: 16, Seed: 1, PrintEvery: 10000}
	if spec.Initrd != "" || spec.Disk != nil || (spec.Network != "" && spec.Network != runner.NetworkNone) {
		return p, fmt.Errorf("the kvm runner's guest takes no initrd, disk or network: %w", errdefs.ErrInvalidArgument)
	}
	for _, kv := range strings.Fields(spec.Cmdline) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return p, fmt.Errorf("command line %q: want key=number: %w", kv, errdefs.ErrInvalidArgument)
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return p, fmt.Errorf("setting %s=%q: want a number: %w", k, v, errdefs.ErrInvalidArgument)
		}
		switch k {
		case "pages_per_tick":
			p.PagesPerTick = n
		case "seed":
			p.Seed = n
		case "print_every":
			p.PrintEvery = n
		case "tick_rate":
			p.TickRate = int(n)
		default:
			return p, fmt.Errorf("unknown setting %q: %w", k, errdefs.ErrInvalidArgument)
		}
	}
	if spec.CPUs > 1 {
		return p, fmt.Errorf("%d vCPUs: this backend runs one: %w", spec.CPUs, errdefs.ErrInvalidArgument)
	}
	if err := p.check(); err != nil {
		return p, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	return p, nil
}

// Start implements runner.Runner: it boots spec.Kernel, a conformance-guest
// binary, in a new VMM process.
func (r *Runner) Start(ctx context.Context, spec runner.Spec) (runner.Machine, error) {
	p, err := paramsOf(spec)
	if err != nil {
		return nil, err
	}
	if err := checkKVM(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(spec.Kernel); err != nil {
		return nil, fmt.Errorf("guest binary: %w", err)
	}
	m, err := r.spawn(p)
	if err != nil {
		return nil, err
	}
	var resp response
	if err := m.call(request{Op: "boot", Params: &p, Guest: spec.Kernel, Console: m.consolePath}, &resp); err != nil {
		m.kill(err)
		return nil, err
	}
	m.pid, m.memAddr = resp.Pid, resp.MemAddr
	m.running = true
	return m, nil
}

// checkKVM says clearly when /dev/kvm cannot be used.
func checkKVM() error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return errcat.NotSupported("/dev/kvm: %w", err)
	}
	return f.Close()
}

// Restore implements runner.Runner.
func (r *Runner) Restore(ctx context.Context, snap string, opts runner.RestoreOptions) (runner.Machine, error) {
	r.restoring.Add(1)
	defer func() {
		r.lastRestore.Store(int64(monotonic()))
		r.restoring.Add(-1)
	}()
	blob, err := r.stateBlob(snap)
	if err != nil {
		return nil, fmt.Errorf("restoring %s: %w", snap, err)
	}
	// The VMM reads the vCPU's state; the runner needs only the
	// parameters (the whole blob is still checked to be JSON).
	var st struct {
		Params Params `json:"params"`
	}
	if err := json.Unmarshal(blob, &st); err != nil {
		return nil, fmt.Errorf("restoring %s: machine state unreadable: %w: %w", snap, err, errdefs.ErrDataLoss)
	}
	if err := checkKVM(); err != nil {
		return nil, err
	}
	m, err := r.spawn(st.Params)
	if err != nil {
		return nil, err
	}
	r.tell(stepSpawned)
	var resp response
	fd, err := m.callFD(request{Op: "restore", Params: &st.Params, State: blob, Console: m.consolePath}, &resp)
	if err != nil {
		m.kill(err)
		return nil, err
	}
	r.tell(stepRestored)
	m.pid, m.memAddr, m.fd, m.phases = resp.Pid, resp.MemAddr, fd, resp.Phases
	// A snapshot on its way to the store is served from its overlay over
	// the nearest snapshot that is in the store.
	mopts := r.Memory
	mopts.Overlay = r.overlayOf(snap)
	if mopts.Tables == nil {
		mopts.Tables = r.pageTables()
	}
	h := memstore.Handoff{Snapshot: r.inStore(snap), Map: memstore.DefaultMap, Regions: []memstore.RegionLayout{{Base: resp.MemAddr, Size: uint64(st.Params.MemSize), PageSize: memstore.PageSize}}}
	srv, err := memstore.Serve(context.Background(), r.Graph, fd, h, nil, mopts)
	if mopts.Overlay != nil {
		mopts.Overlay.Release() // the server holds its own reference
	}
	if err != nil {
		m.kill(err)
		return nil, fmt.Errorf("restoring %s: %w", snap, err)
	}
	m.server, m.restoredFrom, m.last = srv, snap, snap
	r.tell(stepServing)
	go func() {
		select {
		case <-srv.Failed():
			// The vCPU waits on a page nobody can serve: end the VMM.
			m.kill(fmt.Errorf("serving guest memory: %w", srv.Err()))
		case <-m.done:
		}
	}()
	if opts.Unique {
		var b [8]byte
		_, _ = rand.Read(b[:])
		if err := m.call(request{Op: "reseed", Seed: binary.LittleEndian.Uint64(b[:])}, nil); err != nil {
			m.kill(err)
			return nil, err
		}
	}
	if !opts.Paused {
		if err := m.Continue(ctx); err != nil {
			m.kill(err)
			return nil, err
		}
	}
	return m, nil
}

// spawn starts a VMM process connected by a socket pair.
// spawn returns a VMM process for a machine with params p: a warm one if
// the pool has one, else a new one.
func (r *Runner) spawn(p Params) (*Machine, error) {
	m := r.takePooled()
	if m == nil {
		var err error
		if m, err = r.startVMM(); err != nil {
			return nil, err
		}
	}
	r.expect.Store(&p)
	if r.Pool > 0 {
		go r.refill()
	}
	m.params = p
	return m, nil
}

// startSpare starts a VMM process for the pool, and has it prepare a
// machine like the last one asked for, if any.
func (r *Runner) startSpare() (*Machine, error) {
	m, err := r.startVMM()
	if err != nil {
		return nil, err
	}
	if p := r.expect.Load(); p != nil {
		if err := m.call(request{Op: "prepare", Params: p}, nil); err != nil {
			_ = m.Stop(context.Background())
			return nil, err
		}
	}
	return m, nil
}

// takePooled returns a live process from the warm pool, or nil.
func (r *Runner) takePooled() *Machine {
	r.poolMu.Lock()
	defer r.poolMu.Unlock()
	for len(r.pool) > 0 {
		m := r.pool[0]
		r.pool = r.pool[1:]
		select {
		case <-m.done:
		default:
			return m
		}
	}
	return nil
}

// refill starts VMM processes until the pool holds Pool of them.
func (r *Runner) refill() {
	r.poolMu.Lock()
	if r.refilling {
		r.poolMu.Unlock()
		return
	}
	r.refilling = true
	r.poolMu.Unlock()
	defer func() {
		r.poolMu.Lock()
		r.refilling = false
		r.poolMu.Unlock()
	}()
	for {
		r.poolMu.Lock()
		full := r.closed || len(r.pool) >= r.Pool
		r.poolMu.Unlock()
		if full {
			return
		}
		m, err := r.startSpare()
		if err != nil {
			return
		}
		r.poolMu.Lock()
		if r.closed {
			r.poolMu.Unlock()
			_ = m.Stop(context.Background())
			return
		}
		r.pool = append(r.pool, m)
		r.poolMu.Unlock()
	}
}

// Close stops the warm VMM processes and waits for the background writes
// of fork snapshots to end (Flush writes again those that failed).
// Machines already started are not affected; a Runner with Pool set, or
// whose machines fork, should be closed when done with.
func (r *Runner) Close() error {
	r.poolMu.Lock()
	r.closed = true
	pool := r.pool
	r.pool = nil
	r.poolMu.Unlock()
	for _, m := range pool {
		_ = m.Stop(context.Background())
	}
	r.pendMu.Lock()
	for _, p := range r.pending {
		p.hurryUp()
	}
	r.pendMu.Unlock()
	r.writers.Wait()
	return nil
}

// startVMM starts a VMM process connected by a socket pair.
func (r *Runner) startVMM() (*Machine, error) {
	if len(r.Command) == 0 {
		return nil, fmt.Errorf("kvm runner: no VMM command: %w", errdefs.ErrInvalidArgument)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "vmm"), os.NewFile(uintptr(fds[1]), "vmm")
	defer theirs.Close()
	c, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("kvm-%d-%d", os.Getpid(), r.ids.Add(1))
	cmd := exec.Command(r.Command[0], r.Command[1:]...)
	cmd.Env = append(os.Environ(), r.Env...)
	cmd.ExtraFiles = []*os.File{theirs}
	stderr := &tailBuffer{}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		c.Close()
		return nil, fmt.Errorf("starting the VMM: %w", err)
	}
	m := &Machine{r: r, id: id, cmd: cmd, conn: c.(*net.UnixConn), done: make(chan struct{})}
	m.rd = bufio.NewReaderSize(m.conn, 1<<20)
	if r.Dir != "" {
		m.consolePath = filepath.Join(r.Dir, id+".console")
	}
	go func() {
		err := cmd.Wait()
		if err == nil {
			err = errors.New("VMM exited")
		}
		if last := stderr.lastLine(); last != "" {
			err = fmt.Errorf("%s (%w)", last, err)
		}
		m.finish(fmt.Errorf("VMM process %d: %w", cmd.Process.Pid, err))
	}()
	return m, nil
}

// Machine is a VM run by a VMM process.
type Machine struct {
	r           *Runner
	id          string
	cmd         *exec.Cmd
	conn        *net.UnixConn
	rd          *bufio.Reader
	consolePath string
	params      Params
	pid         int
	memAddr     uint64
	fd          *uffd.FD
	server      *memstore.Server
	phases      []phase // the VMM's restore, for benchmarks

	// callMu serialises requests; mu protects the fields below.
	callMu       sync.Mutex
	mu           sync.Mutex
	running      bool
	last         string // the previous snapshot: the base of incremental ones
	restoredFrom string
	done         chan struct{}
	err          error
	stopOnce     sync.Once
}

// ID implements runner.Machine.
func (m *Machine) ID() string { return m.id }

// The kvm runner's machines have two optional capabilities.
var (
	_ runner.CPUMeter    = (*Machine)(nil)
	_ runner.MemoryMeter = (*Machine)(nil)
)

// CPUTime is the CPU time the machine's VMM process has used
// (runner.CPUMeter).
func (m *Machine) CPUTime() (time.Duration, error) {
	select {
	case <-m.done:
		return 0, fmt.Errorf("kvm: %s has stopped: %w", m.id, errdefs.ErrFailedPrecondition)
	default:
	}
	return procstat.CPUTime(m.pid)
}

// Memory is the host memory the machine's VMM process holds
// (runner.MemoryMeter).
func (m *Machine) Memory() (runner.MemoryUse, error) {
	select {
	case <-m.done:
		return runner.MemoryUse{}, fmt.Errorf("kvm: %s has stopped: %w", m.id, errdefs.ErrFailedPrecondition)
	default:
	}
	r, err := procstat.MemoryRollup(m.pid)
	if err != nil {
		return runner.MemoryUse{}, err
	}
	return runner.MemoryUse{RSS: r.RSS, PSS: r.PSS}, nil
}

// PID is the VMM process.
func (m *Machine) PID() int { return m.pid }

// Server is the page-fault server of a restored machine (nil otherwise).
func (m *Machine) Server() *memstore.Server { return m.server }

func (m *Machine) call(req request, resp *response) error {
	_, err := m.roundTrip(req, resp, false)
	return err
}

func (m *Machine) callFD(req request, resp *response) (*uffd.FD, error) {
	return m.roundTrip(req, resp, true)
}

// roundTrip sends one request and reads its response (and a descriptor).
func (m *Machine) roundTrip(req request, resp *response, wantFD bool) (*uffd.FD, error) {
	m.callMu.Lock()
	defer m.callMu.Unlock()
	select {
	case <-m.done:
		return nil, m.Err()
	default:
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := m.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("VMM %s: %s: %w", m.id, req.Op, err)
	}
	var fd *uffd.FD
	var line []byte
	if wantFD {
		// The descriptor rides on the first bytes of the response.
		buf := make([]byte, 1<<16)
		oob := make([]byte, unix.CmsgSpace(4))
		n, oobn, _, _, err := m.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return nil, fmt.Errorf("VMM %s: %s: %w", m.id, req.Op, err)
		}
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(msgs) == 1 {
			if fds, err := unix.ParseUnixRights(&msgs[0]); err == nil && len(fds) == 1 {
				f := os.NewFile(uintptr(fds[0]), "userfaultfd")
				fd, err = uffd.FromFile(f)
				f.Close()
				if err != nil {
					return nil, err
				}
			}
		}
		line = buf[:n]
		for len(line) == 0 || line[len(line)-1] != '\n' {
			rest, err := m.rd.ReadBytes('\n')
			line = append(line, rest...)
			if err != nil {
				return nil, fmt.Errorf("VMM %s: %s: %w", m.id, req.Op, err)
			}
		}
	} else {
		line, err = m.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("VMM %s: %s: %w", m.id, req.Op, err)
		}
	}
	var r response
	if err := json.Unmarshal(line, &r); err != nil {
		return nil, fmt.Errorf("VMM %s: %s: bad response: %w", m.id, req.Op, err)
	}
	if r.Error != "" {
		if fd != nil {
			fd.Close()
		}
		return nil, fmt.Errorf("VMM %s: %s: %s", m.id, req.Op, r.Error)
	}
	if resp != nil {
		*resp = r
	}
	if wantFD && fd == nil {
		return nil, fmt.Errorf("VMM %s: %s: no userfaultfd attached", m.id, req.Op)
	}
	return fd, nil
}

// Pause implements runner.Machine.
func (m *Machine) Pause(ctx context.Context) error {
	if err := m.call(request{Op: "pause"}, nil); err != nil {
		return err
	}
	m.mu.Lock()
	m.running = false
	m.mu.Unlock()
	return nil
}

// Continue implements runner.Machine.
func (m *Machine) Continue(ctx context.Context) error {
	if err := m.call(request{Op: "resume"}, nil); err != nil {
		return err
	}
	m.mu.Lock()
	m.running = true
	m.mu.Unlock()
	return nil
}

// Snapshot implements runner.Machine: pause, save the vCPU state, read and
// clear the dirty log, capture memory (only the dirty pages when
// incremental), resume if it was running.
func (m *Machine) Snapshot(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	if err := m.r.checkFree(name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	m.mu.Lock()
	parent := m.last
	m.mu.Unlock()
	// A delta needs its parent in the store.
	if err := m.r.committed(ctx, parent); err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	held, err := m.hold(ctx)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	labels := map[string]string{runner.LabelRunner: m.r.Name()}
	maps.Copy(labels, opts.Labels)
	copts := memstore.CaptureOptions{Name: name, Parent: parent, Labels: labels, Blobs: map[string][]byte{StateMap: held.blob}}
	if opts.Incremental && parent != "" {
		copts.Dirty = memstore.Bitmap(held.dirty)
	}
	snap, err := memstore.Capture(ctx, m.r.Graph, m.memory(), m.params.MemSize, copts)
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	m.r.tell(stepCaptured)
	m.mu.Lock()
	m.last = name
	m.mu.Unlock()
	if held.wasRunning {
		if err := m.Continue(ctx); err != nil {
			return snap, err
		}
	}
	return snap, nil
}

// held is a machine paused for a snapshot: its state, and the pages it
// dirtied since its previous snapshot (the dirty log, now cleared).
type held struct {
	blob       []byte
	dirty      []uint64
	wasRunning bool
}

// hold pauses the machine, saves its vCPU state and reads and clears the
// dirty log.
func (m *Machine) hold(ctx context.Context) (held, error) {
	m.mu.Lock()
	wasRunning := m.running
	m.mu.Unlock()
	var resp response
	if err := m.call(request{Op: "state"}, &resp); err != nil {
		return held{}, err
	}
	m.mu.Lock()
	m.running = false
	m.mu.Unlock()
	m.r.tell(stepState)
	st := resp.State
	if err := m.call(request{Op: "dirty"}, &resp); err != nil {
		return held{}, err
	}
	m.r.tell(stepDirty)
	blob, err := json.Marshal(st)
	if err != nil {
		return held{}, err
	}
	return held{blob: blob, dirty: resp.Dirty, wasRunning: wasRunning}, nil
}

// Report asks the guest for its checksum and tick at its next step (the
// machine is resumed if paused).
func (m *Machine) Report(ctx context.Context) (Report, error) {
	if err := m.call(request{Op: "report"}, nil); err != nil {
		return Report{}, err
	}
	m.mu.Lock()
	running := m.running
	m.mu.Unlock()
	if !running {
		if err := m.Continue(ctx); err != nil {
			return Report{}, err
		}
	}
	var resp response
	if err := m.call(request{Op: "wait_report"}, &resp); err != nil {
		return Report{}, err
	}
	return *resp.Report, nil
}

// fill has the conformance guest fill count data pages from first with
// fresh data, and waits until it has: an exact amount of dirty memory. The
// machine must be running.
func (m *Machine) fill(first, count uint32) error {
	return m.call(request{Op: "fill", First: first, Count: count}, nil)
}

// firstExit waits until the vCPU has left KVM_RUN once since the machine
// was last started or resumed (the guest runs), and returns when it did on
// the host's CLOCK_MONOTONIC (see monotonic).
func (m *Machine) firstExit() (time.Duration, error) {
	var resp response
	if err := m.call(request{Op: "first_exit"}, &resp); err != nil {
		return 0, err
	}
	return time.Duration(resp.ExitAt), nil
}

// Stop implements runner.Machine. A restored machine's faulted pages are
// kept as its snapshot's working set, for the next restore to prefetch.
func (m *Machine) Stop(ctx context.Context) error {
	m.stopOnce.Do(func() {
		m.mu.Lock()
		if m.err == nil {
			m.err = runner.ErrStopped
		}
		m.mu.Unlock()
		_ = m.call(request{Op: "stop"}, nil)
		select {
		case <-m.done:
		case <-time.After(5 * time.Second):
			_ = m.cmd.Process.Kill()
			<-m.done
		}
		// The working set goes with the snapshot in the store.
		if m.server != nil && m.server.Err() == nil && m.r.committed(ctx, m.restoredFrom) == nil {
			if ws := m.server.WorkingSet(); len(ws) > 0 {
				// Keep what was prefetched (a prefetched restore faults
				// little, and its faults alone would shrink the set) and
				// add what this run faulted besides.
				old, _, _ := m.r.Graph.WorkingSet(m.restoredFrom, memstore.DefaultMap)
				_ = m.r.Graph.SetWorkingSet(m.restoredFrom, memstore.DefaultMap, mergePages(old, ws))
			}
		}
	})
	return nil
}

// kill ends the VMM process after a failure.
func (m *Machine) kill(err error) {
	m.mu.Lock()
	if m.err == nil {
		m.err = err
	}
	m.mu.Unlock()
	_ = m.cmd.Process.Kill()
}

// finish runs once the VMM process has exited.
func (m *Machine) finish(err error) {
	m.mu.Lock()
	if m.err == nil {
		m.err = err
	}
	m.running = false
	m.mu.Unlock()
	if m.server != nil {
		m.server.Shutdown()
	}
	if m.fd != nil {
		m.fd.Close()
	}
	m.conn.Close()
	close(m.done)
}

// Done implements runner.Machine.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Err implements runner.Machine.
func (m *Machine) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Console implements runner.Machine.
func (m *Machine) Console() []byte {
	if m.consolePath == "" {
		return nil
	}
	b, _ := os.ReadFile(m.consolePath)
	return b
}

// memory reads the VMM's guest memory.
func (m *Machine) memory() remoteMemory {
	return remoteMemory{pid: m.pid, base: m.memAddr, size: m.params.MemSize}
}

// remoteMemory reads another process's memory with process_vm_readv. A page
// of a lazily restored machine that is not yet there faults in that process
// and is served like any other.
type remoteMemory struct {
	pid  int
	base uint64
	size int64
}

func (r remoteMemory) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	want := min(int64(len(p)), r.size-off)
	done := int64(0)
	for done < want {
		local := []unix.Iovec{{Base: &p[done]}}
		local[0].SetLen(int(want - done))
		remote := []unix.RemoteIovec{{Base: uintptr(r.base + uint64(off+done)), Len: int(want - done)}}
		n, err := unix.ProcessVMReadv(r.pid, local, remote, 0)
		if err != nil {
			return int(done), fmt.Errorf("reading guest memory of process %d: %w", r.pid, err)
		}
		if n == 0 {
			return int(done), fmt.Errorf("reading guest memory of process %d: no progress", r.pid)
		}
		done += int64(n)
	}
	if want < int64(len(p)) {
		return int(done), io.EOF
	}
	return int(done), nil
}

// readPages reads the listed pages (ascending) back to back into dst, with
// as few process_vm_readv calls as the runs of contiguous pages allow.
func (r remoteMemory) readPages(pages []uint64, dst []byte) error {
	const maxIov = 1024 // IOV_MAX
	var remote []unix.RemoteIovec
	done := 0
	flush := func() error {
		if len(remote) == 0 {
			return nil
		}
		want := 0
		for _, v := range remote {
			want += v.Len
		}
		local := []unix.Iovec{{Base: &dst[done]}}
		local[0].SetLen(want)
		n, err := unix.ProcessVMReadv(r.pid, local, remote, 0)
		if err != nil {
			return fmt.Errorf("reading guest memory of process %d: %w", r.pid, err)
		}
		if n != want {
			return fmt.Errorf("reading guest memory of process %d: %d of %d bytes", r.pid, n, want)
		}
		done += want
		remote = remote[:0]
		return nil
	}
	for i := 0; i < len(pages); {
		j := i + 1
		for j < len(pages) && pages[j] == pages[i]+uint64(j-i) {
			j++
		}
		if int64(pages[j-1]+1)*memstore.PageSize > r.size {
			return fmt.Errorf("page %d is beyond guest memory", pages[j-1])
		}
		remote = append(remote, unix.RemoteIovec{Base: uintptr(r.base + pages[i]*memstore.PageSize), Len: (j - i) * memstore.PageSize})
		if len(remote) == maxIov {
			if err := flush(); err != nil {
				return err
			}
		}
		i = j
	}
	return flush()
}

// tailBuffer keeps the end of a VMM's stderr, where it says why it exited.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > 4096 {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-4096:]...)
	}
	return len(p), nil
}

// lastLine returns the last non-empty line written.
func (t *tailBuffer) lastLine() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	lines := strings.Split(strings.TrimSpace(string(t.buf)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// mergePages returns a followed by the pages of b not in a.
func mergePages(a, b []uint64) []uint64 {
	seen := make(map[uint64]bool, len(a))
	out := make([]uint64, 0, len(a)+len(b))
	for _, p := range a {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for _, p := range b {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}
