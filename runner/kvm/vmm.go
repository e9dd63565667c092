package kvm

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/memstore"
	"golang.org/x/sys/unix"
)

// The VMM protocol: the runner writes one JSON request per line on the
// VMM's socket; the VMM answers each with one JSON response line, in order.
// The response to "restore" carries the userfaultfd of guest memory
// (SCM_RIGHTS), for the runner to serve.
type request struct {
	Op      string  `json:"op"` // prepare, boot, restore, resume, pause, state, dirty, report, wait_report, reseed, fill, first_exit, stop
	Params  *Params `json:"params,omitempty"`
	Guest   string  `json:"guest,omitempty"`   // boot: the guest binary
	Console string  `json:"console,omitempty"` // boot, restore: console file
	// State is the machine state for restore, as the snapshot stores it
	// (a State in JSON), passed on without decoding it twice.
	State json.RawMessage `json:"state,omitempty"`
	Seed  uint64          `json:"seed,omitempty"`  // reseed
	Wait  bool            `json:"wait,omitempty"`  // report: wait for the answer
	First uint32          `json:"first,omitempty"` // fill: the first data page
	Count uint32          `json:"count,omitempty"` // fill: how many pages
}

type response struct {
	Error   string   `json:"error,omitempty"`
	Pid     int      `json:"pid,omitempty"`
	MemAddr uint64   `json:"mem_addr,omitempty"`
	State   *State   `json:"state,omitempty"`
	Dirty   []uint64 `json:"dirty,omitempty"`
	Report  *Report  `json:"report,omitempty"`
	// ExitAt answers first_exit: when the vCPU first left KVM_RUN after
	// the latest start or resume, in CLOCK_MONOTONIC nanoseconds.
	ExitAt int64 `json:"exit_at,omitempty"`
	// Phases answers restore: when each of its phases ended.
	Phases []phase `json:"phases,omitempty"`
}

// phase is when a named phase of a request ended, in CLOCK_MONOTONIC
// nanoseconds, for benchmarks that show where the time goes.
type phase struct {
	Name string `json:"name"`
	At   int64  `json:"at"`
}

// VMMMain runs a VMM process on conn until told to stop or the runner goes
// away. It is what `boxd vmm` runs.
func VMMMain(conn *net.UnixConn) error {
	v := &vmm{conn: conn}
	defer v.close()
	sc := bufio.NewScanner(conn)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var req request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			return fmt.Errorf("vmm: bad request: %w", err)
		}
		// busy is held while a request is answered, so that a guest that
		// stops on its own does not end the process before the answer
		// has gone out.
		v.busy.Lock()
		resp, fd, err := v.handle(req)
		if err != nil {
			resp = response{Error: err.Error()}
		}
		err = v.reply(resp, fd)
		v.busy.Unlock()
		if err != nil {
			return err
		}
		if req.Op == "stop" {
			return nil
		}
	}
	return sc.Err()
}

type vmm struct {
	busy    sync.Mutex
	conn    *net.UnixConn
	m       *localVM
	console *os.File
	fd      *uffd.FD
	// pre is a VM built ahead by "prepare" (memory registered with
	// preFD and handed to KVM, vCPU created), for a restore of its memory
	// size to take.
	pre   *localVM
	preFD *uffd.FD
}

func (v *vmm) close() {
	v.dropPrepared()
	if v.m != nil {
		v.m.shutdown()
		v.m.close()
	}
	if v.fd != nil {
		v.fd.Close()
	}
	if v.console != nil {
		v.console.Close()
	}
}

func (v *vmm) reply(r response, fd *uffd.FD) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if fd == nil {
		_, err = v.conn.Write(b)
		return err
	}
	_, _, err = v.conn.WriteMsgUnix(b, unix.UnixRights(fd.Fd()), nil)
	return err
}

// prepare builds, for a restore to come, what does not depend on the
// snapshot: the VM, guest memory registered with a userfaultfd and handed
// to KVM, and the vCPU with its CPUID. A pooled VMM does it while it
// waits, which takes the slowest steps of a restore (creating the VM and
// its memory slot) off the restore's path.
func (v *vmm) prepare(p Params) error {
	if v.m != nil || v.pre != nil {
		return errors.New("a machine is already prepared or running")
	}
	m, err := newLocalVM(p, nil)
	if err != nil {
		return err
	}
	// Registered before KVM sees the memory, as in restore.
	fd, err := memstore.Register(m.mem)
	if err != nil {
		m.close()
		return err
	}
	if err := m.mapMemory(); err != nil {
		fd.Close()
		m.close()
		return err
	}
	v.pre, v.preFD = m, fd
	return nil
}

// takePrepared returns the prepared VM and its userfaultfd if it fits p,
// and drops it otherwise.
func (v *vmm) takePrepared(p Params) (*localVM, *uffd.FD) {
	if v.pre == nil || v.pre.params.MemSize != p.MemSize {
		v.dropPrepared()
		return nil, nil
	}
	m, fd := v.pre, v.preFD
	v.pre, v.preFD = nil, nil
	m.params = p
	return m, fd
}

func (v *vmm) dropPrepared() {
	if v.pre != nil {
		v.pre.close()
		v.preFD.Close()
		v.pre, v.preFD = nil, nil
	}
}

func (v *vmm) handle(req request) (response, *uffd.FD, error) {
	if req.Op == "prepare" {
		if req.Params == nil {
			return response{}, nil, errors.New("params missing")
		}
		return response{}, nil, v.prepare(*req.Params)
	}
	if v.m == nil && req.Op != "boot" && req.Op != "restore" && req.Op != "stop" {
		return response{}, nil, errors.New("no machine yet: boot or restore first")
	}
	switch req.Op {
	case "boot", "restore":
		if v.m != nil {
			return response{}, nil, errors.New("a machine is already running")
		}
		if req.Params == nil {
			return response{}, nil, errors.New("params missing")
		}
		var phases []phase
		mark := func(name string) { phases = append(phases, phase{Name: name, At: int64(monotonic())}) }
		mark("request")
		var pre *localVM
		if req.Op == "restore" {
			pre, v.fd = v.takePrepared(*req.Params)
		} else {
			v.dropPrepared()
		}
		if err := v.open(req, pre); err != nil {
			return response{}, nil, err
		}
		mark("vm")
		go v.exitWithGuest()
		resp := response{Pid: os.Getpid(), MemAddr: uint64(uffd.Addr(v.m.mem))}
		if req.Op == "boot" {
			code, err := os.ReadFile(req.Guest)
			if err != nil {
				return response{}, nil, fmt.Errorf("guest: %w", err)
			}
			if err := v.m.boot(code); err != nil {
				return response{}, nil, err
			}
			v.m.start()
			return resp, nil, nil
		}
		var st State
		if err := json.Unmarshal(req.State, &st); err != nil {
			return response{}, nil, fmt.Errorf("state: %w", err)
		}
		if pre == nil {
			// Register guest memory with userfaultfd before KVM sees it,
			// so that its first touch of every page is served by the
			// runner.
			fd, err := memstore.Register(v.m.mem)
			if err != nil {
				return response{}, nil, err
			}
			v.fd = fd
			mark("uffd")
			if err := v.m.mapMemory(); err != nil {
				return response{}, nil, err
			}
			mark("memslot")
		}
		fd := v.fd
		if err := v.m.restoreState(st); err != nil {
			return response{}, nil, err
		}
		mark("vcpu-state")
		resp.Phases = phases
		return resp, fd, nil
	case "resume":
		v.m.mu.Lock()
		started := v.m.started
		v.m.mu.Unlock()
		if !started {
			v.m.start()
			return response{}, nil, nil
		}
		return response{}, nil, v.m.resume()
	case "pause":
		return response{}, nil, v.m.pause()
	case "state":
		if err := v.m.pause(); err != nil {
			return response{}, nil, err
		}
		st, err := v.m.saveState()
		return response{State: &st}, nil, err
	case "dirty":
		bitmap, err := v.m.vm.DirtyLog(0, int(v.m.params.MemSize/memstore.PageSize))
		return response{Dirty: bitmap}, nil, err
	case "report":
		if !req.Wait {
			v.m.requestReport()
			return response{}, nil, nil
		}
		r, err := v.m.report(30 * time.Second)
		return response{Report: &r}, nil, err
	case "wait_report":
		r, err := v.m.waitReport(30 * time.Second)
		return response{Report: &r}, nil, err
	case "reseed":
		v.m.reseed(req.Seed)
		return response{}, nil, nil
	case "fill":
		return response{}, nil, v.m.fill(req.First, req.Count, 5*time.Minute)
	case "first_exit":
		at, err := v.m.waitFirstExit(30 * time.Second)
		return response{ExitAt: int64(at)}, nil, err
	case "stop":
		return response{}, nil, nil
	}
	return response{}, nil, fmt.Errorf("unknown op %q", req.Op)
}

// exitWithGuest ends the VMM process when its guest stops on its own
// (halts, crashes): the reason goes to stderr, where the runner reads it.
func (v *vmm) exitWithGuest() {
	<-v.m.stopped
	v.m.mu.Lock()
	reason := v.m.exit
	requested := errors.Is(reason, errStopped)
	v.m.mu.Unlock()
	if requested {
		return
	}
	v.busy.Lock()
	fmt.Fprintf(os.Stderr, "%v\n", reason)
	os.Exit(3)
}

// open sets up the machine: pre, a prepared VM, or a new one.
func (v *vmm) open(req request, pre *localVM) error {
	if req.Console != "" {
		f, err := os.OpenFile(req.Console, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("console: %w", err)
		}
		v.console = f
	}
	var console io.Writer
	if v.console != nil {
		console = v.console
	}
	if pre != nil {
		pre.console = console
		v.m = pre
		return nil
	}
	m, err := newLocalVM(*req.Params, console)
	if err != nil {
		return err
	}
	v.m = m
	return nil
}

// VMMFD is the descriptor on which a VMM process finds its socket.
const VMMFD = 3

// ServeInherited runs VMMMain on the socket the runner passed as VMMFD.
func ServeInherited() error {
	f := os.NewFile(VMMFD, "vmm")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("vmm: descriptor %d is not the runner's socket: %w", VMMFD, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("vmm: descriptor %d is not a unix socket", VMMFD)
	}
	return VMMMain(uc)
}
