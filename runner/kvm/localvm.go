package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	ikvm "github.com/boxd-dev/boxd/internal/kvm"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/kvm/guest"
	"golang.org/x/sys/unix"
)

// Params configure the conformance guest.
type Params struct {
	MemSize      int64  `json:"mem_size"`       // bytes of guest RAM: a multiple of 2 MiB, at most 1 GiB
	PagesPerTick uint64 `json:"pages_per_tick"` // pages the writer dirties each tick
	Seed         uint64 `json:"seed"`
	PrintEvery   uint64 `json:"print_every"` // ticks between console lines; 0 for none
	TickRate     int    `json:"tick_rate"`   // at most this many ticks a second; 0 for no limit
}

const (
	maxMem   = 1 << 30
	hugePage = 2 << 20
)

func (p Params) check() error {
	if p.MemSize < 4*hugePage || p.MemSize > maxMem || p.MemSize%hugePage != 0 {
		return fmt.Errorf("guest memory of %d bytes: want a multiple of 2 MiB from 8 MiB to 1 GiB", p.MemSize)
	}
	return nil
}

// VCPUState is a vCPU's saved state, in the order KVM restores it.
type VCPUState struct {
	MPState ikvm.MPState    `json:"mp_state"`
	Regs    ikvm.Regs       `json:"regs"`
	Sregs   ikvm.Sregs      `json:"sregs"`
	XSave   ikvm.XSave      `json:"xsave"`
	Debug   ikvm.DebugRegs  `json:"debugregs"`
	MSRs    []ikvm.MSR      `json:"msrs"`
	Events  ikvm.VCPUEvents `json:"events"`
}

// State is everything besides memory that a machine needs to go on.
type State struct {
	Params Params    `json:"params"`
	VCPU   VCPUState `json:"vcpu"`
}

// Report is what the guest answers on its report port.
type Report struct {
	Checksum uint64 `json:"checksum"`
	Tick     uint64 `json:"tick"`
}

// localVM is the one VM, with one vCPU, that a VMM process runs: the heart
// of the VMM process (Machine is the runner's handle on such a process).
// Its vCPU runs on a goroutine locked to its OS thread.
type localVM struct {
	sys     *ikvm.System
	vm      *ikvm.VM
	cpu     *ikvm.VCPU
	mem     []byte
	params  Params
	console io.Writer

	// mu protects the fields below.
	mu       sync.Mutex
	cond     *sync.Cond
	want     runState // what the controller asked for
	is       runState // what the vCPU loop is doing
	cmds     []uint32 // answers to the next control reads, in order
	reportIn []uint32
	reports  chan Report
	args     []uint32      // words the guest reads on PortSeed (CmdReseed, CmdFill)
	exit     error         // why the vCPU stopped for good
	stopped  chan struct{} // closed with exit set
	started  bool          // the vCPU loop runs
	tid      int           // the vCPU thread, for kicking it out of KVM_RUN
	// ctrlReads counts the guest's reads of the control port; waiters
	// are woken when it reaches theirs (a command has been carried out
	// once the guest asks for the next one).
	ctrlReads uint64
	waiters   []ctrlWaiter
	// firstExit is closed when the vCPU first leaves KVM_RUN after the
	// latest start or resume, at firstExitAt (CLOCK_MONOTONIC): proof
	// that the guest runs. awaitExit says it is still open, so that the
	// vCPU loop takes m.mu for it only once.
	firstExit   chan struct{}
	firstExitAt time.Duration
	awaitExit   atomic.Bool
}

type ctrlWaiter struct {
	reads uint64
	done  chan struct{}
}

type runState int

const (
	stateRunning runState = iota
	statePaused
	stateStopped
)

// newLocalVM creates the VM, its memory (private anonymous) and its vCPU,
// with dirty logging on. mem is returned for the caller to fill or register
// before the vCPU first runs.
func newLocalVM(p Params, console io.Writer) (*localVM, error) {
	if err := p.check(); err != nil {
		return nil, err
	}
	sys, err := ikvm.Open()
	if err != nil {
		return nil, err
	}
	m := &localVM{sys: sys, params: p, console: console, want: statePaused, is: statePaused, reports: make(chan Report, 1), stopped: make(chan struct{}), firstExit: make(chan struct{})}
	m.cond = sync.NewCond(&m.mu)
	ok := false
	defer func() {
		if !ok {
			m.close()
		}
	}()
	if m.vm, err = sys.CreateVM(); err != nil {
		return nil, err
	}
	m.mem, err = unix.Mmap(-1, 0, int(p.MemSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("guest memory: %w", err)
	}
	if m.cpu, err = m.vm.CreateVCPU(0); err != nil {
		return nil, err
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	if err := m.cpu.SetCPUID(cpuid); err != nil {
		return nil, err
	}
	ok = true
	return m, nil
}

// mapMemory hands guest memory to KVM. It comes after any userfaultfd
// registration, so that KVM's first touch of a page is served.
func (m *localVM) mapMemory() error {
	return m.vm.SetMemory(0, 0, m.mem, ikvm.MemFlagLogDirty)
}

func (m *localVM) close() {
	if m.cpu != nil {
		m.cpu.Close()
	}
	if m.vm != nil {
		m.vm.Close()
	}
	if m.mem != nil {
		_ = unix.Munmap(m.mem)
	}
	m.sys.Close()
}

// boot writes the guest, its page tables, GDT and parameters into memory
// and puts the vCPU in 64-bit long mode at the guest's entry.
func (m *localVM) boot(code []byte) error {
	if len(code) > guest.StackTop-guest.Load-0x10000 {
		return fmt.Errorf("guest of %d bytes is too large", len(code))
	}
	mem := m.mem
	le := binary.LittleEndian
	// GDT: null, 64-bit code (selector 8), data (selector 16).
	le.PutUint64(mem[guest.GDTAddr:], 0)
	le.PutUint64(mem[guest.GDTAddr+8:], 0x00af9a000000ffff)
	le.PutUint64(mem[guest.GDTAddr+16:], 0x00cf92000000ffff)
	// Identity map of all of RAM with 2 MiB pages.
	const pdpt, pd = guest.PML4Addr + 0x1000, guest.PML4Addr + 0x2000
	// Entries carry their accessed and dirty bits already: under shadow
	// paging, an entry without them makes KVM trap accesses to set them.
	le.PutUint64(mem[guest.PML4Addr:], pdpt|0x23) // present, writable, accessed
	le.PutUint64(mem[pdpt:], pd|0x23)
	for i := int64(0); i < m.params.MemSize/hugePage; i++ {
		le.PutUint64(mem[pd+8*i:], uint64(i)*hugePage|0xe3) // + dirty, 2 MiB
	}
	p := m.params
	for i, v := range []uint64{uint64(p.MemSize), guest.DataStart, p.PagesPerTick, p.Seed, p.PrintEvery} {
		le.PutUint64(mem[guest.ParamsAddr+8*i:], v)
	}
	copy(mem[guest.Load:], code)
	if err := m.mapMemory(); err != nil {
		return err
	}

	s, err := m.cpu.Sregs()
	if err != nil {
		return err
	}
	code64 := ikvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 8, Type: 11, Present: 1, S: 1, L: 1, G: 1}
	data := ikvm.Segment{Base: 0, Limit: 0xffffffff, Selector: 16, Type: 3, Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code64
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.GDT = ikvm.DTable{Base: guest.GDTAddr, Limit: 23}
	s.CR3 = guest.PML4Addr
	s.CR4 = 1 << 5                                    // PAE
	s.CR0 = 1<<0 | 1<<1 | 1<<4 | 1<<5 | 1<<16 | 1<<31 // PE MP ET NE WP PG
	s.EFER = 1<<8 | 1<<10                             // LME LMA
	if err := m.cpu.SetSregs(s); err != nil {
		return err
	}
	return m.cpu.SetRegs(ikvm.Regs{RIP: guest.Load, RSP: guest.StackTop, RFLAGS: 2})
}

// saveState reads the vCPU's state. Precondition: paused.
func (m *localVM) saveState() (State, error) {
	st := State{Params: m.params}
	v := &st.VCPU
	var err error
	steps := []struct {
		name string
		fn   func() error
	}{
		{"mp_state", func() error { v.MPState, err = m.cpu.MPState(); return err }},
		{"regs", func() error { v.Regs, err = m.cpu.Regs(); return err }},
		{"sregs", func() error { v.Sregs, err = m.cpu.Sregs(); return err }},
		{"xsave", func() error { v.XSave, err = m.cpu.XSave(); return err }},
		{"debugregs", func() error { v.Debug, err = m.cpu.DebugRegs(); return err }},
		{"msrs", func() error {
			idx, err := m.sys.MSRIndexList()
			if err != nil {
				return err
			}
			v.MSRs, err = m.cpu.MSRs(idx)
			return err
		}},
		{"vcpu_events", func() error { v.Events, err = m.cpu.Events(); return err }},
	}
	for _, s := range steps {
		if err := s.fn(); err != nil {
			return st, fmt.Errorf("saving vCPU state: %s: %w", s.name, err)
		}
	}
	return st, nil
}

// restoreState sets the vCPU's state, in Firecracker's restore order.
// MSRs KVM refuses (it refuses some it lists) are skipped.
func (m *localVM) restoreState(st State) error {
	v := st.VCPU
	steps := []struct {
		name string
		fn   func() error
	}{
		{"mp_state", func() error { return m.cpu.SetMPState(v.MPState) }},
		{"regs", func() error { return m.cpu.SetRegs(v.Regs) }},
		{"sregs", func() error { return m.cpu.SetSregs(v.Sregs) }},
		{"xsave", func() error { return m.cpu.SetXSave(v.XSave) }},
		{"debugregs", func() error { return m.cpu.SetDebugRegs(v.Debug) }},
		{"msrs", func() error {
			// As many as KVM takes with each call; skip the one it
			// refuses and go on after it.
			for rest := v.MSRs; len(rest) > 0; {
				n, err := m.cpu.SetMSRs(rest)
				if err != nil {
					return err
				}
				if n < len(rest) {
					n++
				}
				rest = rest[n:]
			}
			return nil
		}},
		{"vcpu_events", func() error { return m.cpu.SetEvents(v.Events) }},
	}
	for _, s := range steps {
		if err := s.fn(); err != nil {
			return fmt.Errorf("restoring vCPU state: %s: %w", s.name, err)
		}
	}
	return nil
}

// start runs the vCPU loop on its own locked thread.
func (m *localVM) start() {
	m.mu.Lock()
	m.want = stateRunning
	m.started = true
	m.watchFirstExitLocked()
	m.mu.Unlock()
	go m.loop()
}

// watchFirstExitLocked arms firstExit for the next run. Precondition: m.mu
// is held.
func (m *localVM) watchFirstExitLocked() {
	if !m.awaitExit.Load() {
		m.firstExit = make(chan struct{})
		m.firstExitAt = 0
		m.awaitExit.Store(true)
	}
}

// noteExit records the vCPU's first exit since it was armed.
func (m *localVM) noteExit() {
	now := monotonic()
	m.mu.Lock()
	if m.awaitExit.Load() {
		m.firstExitAt = now
		close(m.firstExit)
		m.awaitExit.Store(false)
	}
	m.mu.Unlock()
}

// monotonic reads CLOCK_MONOTONIC, which every process on the host shares.
func monotonic() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

// waitFirstExit waits until the vCPU has left KVM_RUN once since the latest
// start or resume, and says when it did (CLOCK_MONOTONIC).
func (m *localVM) waitFirstExit(timeout time.Duration) (time.Duration, error) {
	m.mu.Lock()
	ch := m.firstExit
	m.mu.Unlock()
	select {
	case <-ch:
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.firstExitAt, nil
	case <-m.stopped:
		m.mu.Lock()
		defer m.mu.Unlock()
		return 0, m.exit
	case <-time.After(timeout):
		return 0, fmt.Errorf("vCPU did not exit within %v", timeout)
	}
}

// kick interrupts KVM_RUN on the vCPU thread (a guest that never exits on
// its own still comes back). Precondition: m.mu is held.
func (m *localVM) kick() {
	if m.tid != 0 && m.is == stateRunning {
		_ = unix.Tgkill(unix.Getpid(), m.tid, unix.SIGURG)
	}
}

// loop is the vCPU thread: KVM_RUN and the exits, until stopped.
func (m *localVM) loop() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	m.mu.Lock()
	m.tid = unix.Gettid()
	m.mu.Unlock()
	var next time.Time
	for {
		m.mu.Lock()
		for m.want == statePaused {
			if m.is != statePaused {
				// Complete the pending port I/O so the saved registers
				// are those after it.
				m.cpu.SetImmediateExit(true)
				_, err := m.cpu.Run()
				m.cpu.SetImmediateExit(false)
				if err != nil {
					m.stopLocked(fmt.Errorf("completing I/O before pausing: %w", err))
					m.mu.Unlock()
					return
				}
				m.is = statePaused
				m.cond.Broadcast()
			}
			m.cond.Wait()
		}
		if m.want == stateStopped {
			m.stopLocked(nil)
			m.mu.Unlock()
			return
		}
		m.is = stateRunning
		m.mu.Unlock()

		reason, err := m.cpu.Run()
		if m.awaitExit.Load() {
			m.noteExit()
		}
		if err != nil {
			m.stop(err)
			return
		}
		switch reason {
		case ikvm.ExitIO:
			if err := m.io(&next); err != nil {
				m.stop(err)
				return
			}
		case ikvm.ExitIntr:
		case ikvm.ExitHLT:
			m.stop(ErrHalted)
			return
		case ikvm.ExitInternalError:
			m.stop(fmt.Errorf("guest stopped: %s (suberror %d)", reason, m.cpu.InternalSuberror()))
			return
		default:
			m.stop(fmt.Errorf("guest stopped: %s", reason))
			return
		}
	}
}

// ErrHalted says the guest halted of its own accord (CmdHalt).
var ErrHalted = errors.New("guest halted")

// errStopped is the exit of a machine stopped on request.
var errStopped = runner.ErrStopped

func (m *localVM) stop(err error) {
	m.mu.Lock()
	m.stopLocked(err)
	m.mu.Unlock()
}

func (m *localVM) stopLocked(err error) {
	m.is, m.want = stateStopped, stateStopped
	if m.exit == nil {
		if err == nil {
			err = errStopped
		}
		m.exit = err
		close(m.stopped)
	}
	m.cond.Broadcast()
}

// io handles one port I/O exit.
func (m *localVM) io(next *time.Time) error {
	io := m.cpu.IO()
	switch {
	case !io.In && io.Port == guest.PortSerial:
		if m.console != nil {
			_, _ = m.console.Write(io.Data)
		}
	case io.In && io.Port == guest.PortCtrl && io.Size == 4:
		m.mu.Lock()
		cmd := uint32(guest.CmdRun)
		if len(m.cmds) > 0 {
			cmd, m.cmds = m.cmds[0], m.cmds[1:]
		}
		m.ctrlReads++
		m.wakeWaitersLocked()
		m.mu.Unlock()
		binary.LittleEndian.PutUint32(io.Data, cmd)
		if r := m.params.TickRate; r > 0 && cmd == guest.CmdRun {
			now := time.Now()
			if now.Before(*next) {
				time.Sleep(next.Sub(now))
			}
			*next = next.Add(time.Second / time.Duration(r))
			if next.Before(now) {
				*next = now.Add(time.Second / time.Duration(r))
			}
		}
	case !io.In && io.Port == guest.PortReport && io.Size == 4:
		m.mu.Lock()
		m.reportIn = append(m.reportIn, binary.LittleEndian.Uint32(io.Data))
		if len(m.reportIn) == 4 {
			r := Report{
				Checksum: uint64(m.reportIn[0]) | uint64(m.reportIn[1])<<32,
				Tick:     uint64(m.reportIn[2]) | uint64(m.reportIn[3])<<32,
			}
			m.reportIn = m.reportIn[:0]
			select {
			case m.reports <- r:
			default:
			}
		}
		m.mu.Unlock()
	case io.In && io.Port == guest.PortSeed && io.Size == 4:
		m.mu.Lock()
		var arg uint32
		if len(m.args) > 0 {
			arg, m.args = m.args[0], m.args[1:]
		}
		m.mu.Unlock()
		binary.LittleEndian.PutUint32(io.Data, arg)
	case !io.In && io.Port == guest.PortDone:
	default:
		return fmt.Errorf("guest used port %#x (%d bytes, in=%v) that nothing serves", io.Port, io.Size, io.In)
	}
	return nil
}

// pause stops the vCPU at its next exit and waits until it has.
func (m *localVM) pause() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.is == stateStopped {
		return m.exit
	}
	m.want = statePaused
	m.cond.Broadcast()
	m.kick()
	for m.is == stateRunning {
		m.cond.Wait()
	}
	if m.is == stateStopped {
		return m.exit
	}
	return nil
}

// resume lets a paused vCPU run on.
func (m *localVM) resume() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.is == stateStopped {
		return m.exit
	}
	m.want = stateRunning
	m.watchFirstExitLocked()
	m.cond.Broadcast()
	return nil
}

// shutdown stops the vCPU loop for good and waits for it to end.
func (m *localVM) shutdown() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.want = stateStopped
	m.cond.Broadcast()
	m.kick()
	for m.started && m.is != stateStopped {
		m.cond.Wait()
	}
}

// report asks the guest for its checksum and tick, which it gives at its
// next tick (after resume, if paused now), and waits for them.
func (m *localVM) report(timeout time.Duration) (Report, error) {
	m.mu.Lock()
	if m.is == stateStopped {
		err := m.exit
		m.mu.Unlock()
		return Report{}, err
	}
	m.cmds = append(m.cmds, guest.CmdReport)
	m.mu.Unlock()
	return m.waitReport(timeout)
}

// reseed has the guest mix seed into its random state at its next tick.
func (m *localVM) reseed(seed uint64) {
	m.mu.Lock()
	m.cmds = append(m.cmds, guest.CmdReseed)
	m.args = append(m.args, uint32(seed), uint32(seed>>32))
	m.mu.Unlock()
}

// fill has the guest fill count data pages from first with fresh data
// (CmdFill) and waits until it has: until it asks for its next command.
// The machine must be running, or be resumed by someone else, to get there.
func (m *localVM) fill(first, count uint32, timeout time.Duration) error {
	m.mu.Lock()
	if m.is == stateStopped {
		err := m.exit
		m.mu.Unlock()
		return err
	}
	m.cmds = append(m.cmds, guest.CmdFill)
	m.args = append(m.args, first, count)
	// The guest takes CmdFill at read ctrlReads+len(cmds) and is done at
	// the read after it.
	w := ctrlWaiter{reads: m.ctrlReads + uint64(len(m.cmds)) + 1, done: make(chan struct{})}
	m.waiters = append(m.waiters, w)
	m.mu.Unlock()
	select {
	case <-w.done:
		return nil
	case <-m.stopped:
		m.mu.Lock()
		defer m.mu.Unlock()
		return m.exit
	case <-time.After(timeout):
		return fmt.Errorf("guest did not fill %d pages within %v", count, timeout)
	}
}

// wakeWaitersLocked wakes the waiters whose control read has come.
// Precondition: m.mu is held.
func (m *localVM) wakeWaitersLocked() {
	kept := m.waiters[:0]
	for _, w := range m.waiters {
		if m.ctrlReads >= w.reads {
			close(w.done)
		} else {
			kept = append(kept, w)
		}
	}
	m.waiters = kept
}

// requestReport sets the next control answer to CmdReport.
func (m *localVM) requestReport() {
	m.mu.Lock()
	m.cmds = append(m.cmds, guest.CmdReport)
	m.mu.Unlock()
}

func (m *localVM) waitReport(timeout time.Duration) (Report, error) {
	select {
	case r := <-m.reports:
		return r, nil
	case <-m.stopped:
		m.mu.Lock()
		defer m.mu.Unlock()
		return Report{}, m.exit
	case <-time.After(timeout):
		return Report{}, fmt.Errorf("guest did not report within %v", timeout)
	}
}
