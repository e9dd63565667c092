package shim

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/proto"
)

// fakeBoxes is the daemon as the shim's tests need it: boxes are records,
// and a kept process is a small program chosen by its first argument:
//
//	echo WORDS...   writes WORDS to stdout, "err" to stderr, exits 0
//	exit N          exits N
//	cat             copies its input to stdout until its input is closed
//	sleep           runs until signalled (exits 128+signal)
//	detach          breaks the link once, then writes "again" and exits 0
//	crash           breaks the link and stops the box, as a guest panic does
//	missing         does not start: there is no such program
type fakeBoxes struct {
	mu        sync.Mutex
	boxes     map[string]*box.Box
	requests  []daemon.CreateRequest
	procs     map[string]*fakeProc // box + "/" + id
	snaps     []string
	held      map[string][]fakeHeld // snapshot -> the processes it holds
	createErr error
	nextPid   int
	rootfs    map[string]string // box + "/" + container id -> source
}

// fakeHeld is a process a snapshot holds.
type fakeHeld struct {
	spec agent.ProcessSpec
	pid  int
}

type fakeProc struct {
	spec       agent.ProcessSpec
	pid        int
	running    bool
	code       int
	signal     chan int
	stdinEnd   chan struct{}
	closeOnce  sync.Once
	rows, cols int
	detached   bool
}

func newFakeBoxes() *fakeBoxes {
	return &fakeBoxes{boxes: map[string]*box.Box{}, procs: map[string]*fakeProc{}, held: map[string][]fakeHeld{}, nextPid: 100, rootfs: map[string]string{}}
}

func (f *fakeBoxes) Create(_ context.Context, req daemon.CreateRequest) (box.Box, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.createErr != nil {
		return box.Box{}, f.createErr
	}
	if _, ok := f.boxes[req.Name]; ok {
		return box.Box{}, fmt.Errorf("box %s: %w", req.Name, errdefs.ErrAlreadyExists)
	}
	f.requests = append(f.requests, req)
	bx := &box.Box{Name: req.Name, State: box.StateRunning, Labels: req.Labels}
	f.boxes[req.Name] = bx
	// A box made from a checkpoint holds its kept processes.
	for _, p := range f.held[req.From] {
		f.procs[req.Name+"/"+p.spec.ID] = &fakeProc{spec: p.spec, pid: p.pid, running: true,
			signal: make(chan int, 4), stdinEnd: make(chan struct{})}
	}
	return *bx, nil
}

func (f *fakeBoxes) get(name string) (*box.Box, error) {
	bx, ok := f.boxes[name]
	if !ok {
		return nil, fmt.Errorf("box %s: %w", name, errdefs.ErrNotFound)
	}
	return bx, nil
}

func (f *fakeBoxes) Get(_ context.Context, name string) (box.Box, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	bx, err := f.get(name)
	if err != nil {
		return box.Box{}, err
	}
	return *bx, nil
}

func (f *fakeBoxes) state(name, state string) (box.Box, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	bx, err := f.get(name)
	if err != nil {
		return box.Box{}, err
	}
	bx.State = state
	return *bx, nil
}

func (f *fakeBoxes) Remove(_ context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.get(name); err != nil {
		return err
	}
	delete(f.boxes, name)
	return nil
}

func (f *fakeBoxes) Stop(_ context.Context, name string) (box.Box, error) {
	return f.state(name, box.StateStopped)
}

func (f *fakeBoxes) Pause(_ context.Context, name string) (box.Box, error) {
	return f.state(name, box.StatePaused)
}

func (f *fakeBoxes) Unpause(_ context.Context, name string) (box.Box, error) {
	return f.state(name, box.StateRunning)
}

func (f *fakeBoxes) Snapshot(_ context.Context, name, snap string) (snapshotter.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	bx, err := f.get(name)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	if bx.State != box.StateRunning && bx.State != box.StatePaused {
		return snapshotter.Snapshot{}, fmt.Errorf("box %s is %s: %w", name, bx.State, errdefs.ErrFailedPrecondition)
	}
	s := "box." + name + "." + snap
	f.snaps = append(f.snaps, s)
	for k, p := range f.procs {
		if strings.HasPrefix(k, name+"/") && p.running {
			f.held[s] = append(f.held[s], fakeHeld{spec: p.spec, pid: p.pid})
		}
	}
	return snapshotter.Snapshot{Name: s}, nil
}

// Stats answers as the daemon does for a box with a machine (running or
// paused): fakeCPUSeconds of CPU and fakePSS of host memory; for one
// without, neither. It does not use the box's agent.
func (f *fakeBoxes) Stats(_ context.Context, opts daemon.StatsOptions) ([]box.Usage, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []box.Usage
	for _, name := range opts.Boxes {
		bx, err := f.get(name)
		if err != nil {
			return nil, err
		}
		u := box.Usage{Name: name, State: bx.State}
		if bx.State == box.StateRunning || bx.State == box.StatePaused {
			cpu := fakeCPUSeconds
			u.CPUSeconds, u.HostMemory = &cpu, &runner.MemoryUse{RSS: 2 * fakePSS, PSS: fakePSS}
		}
		out = append(out, u)
	}
	return out, nil
}

// The figures of fakeBoxes.Stats.
const (
	fakeCPUSeconds = 1.5
	fakePSS        = 300 << 20
)

// use is a call to box name's agent: as the daemon does, it unpauses a
// paused box. The caller holds mu.
func (f *fakeBoxes) use(name string) {
	if bx, ok := f.boxes[name]; ok && bx.State == box.StatePaused {
		bx.State = box.StateRunning
	}
}

func (f *fakeBoxes) proc(name, id string) (*fakeProc, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.use(name)
	p, ok := f.procs[name+"/"+id]
	if !ok {
		return nil, fmt.Errorf("process %s in box %s: %w", id, name, errdefs.ErrNotFound)
	}
	return p, nil
}

func (f *fakeBoxes) ProcessStream(ctx context.Context, name string, spec agent.ProcessSpec, stdio ProcessIO) (int, error) {
	var p *fakeProc
	if spec.Attach {
		var err error
		if p, err = f.proc(name, spec.ID); err != nil {
			return 0, err
		}
	} else {
		if spec.Args[0] == "missing" {
			return 0, fmt.Errorf("starting %s: executable file not found in $PATH: %w", spec.Args[0], errdefs.ErrNotFound)
		}
		f.mu.Lock()
		if _, err := f.get(name); err != nil {
			f.mu.Unlock()
			return 0, err
		}
		if _, ok := f.procs[name+"/"+spec.ID]; ok {
			f.mu.Unlock()
			return 0, fmt.Errorf("process %s: %w", spec.ID, errdefs.ErrAlreadyExists)
		}
		f.nextPid++
		p = &fakeProc{spec: spec, pid: f.nextPid, running: true, signal: make(chan int, 4), stdinEnd: make(chan struct{}),
			rows: spec.Rows, cols: spec.Cols}
		f.procs[name+"/"+spec.ID] = p
		f.mu.Unlock()
	}
	code, err := f.program(name, p, stdio)
	if err != nil {
		return 0, err
	}
	f.mu.Lock()
	p.running, p.code = false, code
	f.mu.Unlock()
	return code, nil
}

func (f *fakeBoxes) program(name string, p *fakeProc, stdio ProcessIO) (int, error) {
	args := p.spec.Args
	switch args[0] {
	case "echo":
		fmt.Fprintln(stdio.Stdout, strings.Join(args[1:], " "))
		if stdio.Stderr != nil {
			fmt.Fprintln(stdio.Stderr, "err")
		}
		return 0, nil
	case "exit":
		n, _ := strconv.Atoi(args[1])
		return n, nil
	case "cat":
		// The input ends at CloseProcessStdin: what is read after is lost.
		data := make(chan []byte)
		go func() {
			buf := make([]byte, 512)
			for {
				n, err := stdio.Stdin.Read(buf)
				if n > 0 {
					data <- append([]byte(nil), buf[:n]...)
				}
				if err != nil {
					return
				}
			}
		}()
		for {
			select {
			case b := <-data:
				_, _ = stdio.Stdout.Write(b)
			case <-p.stdinEnd:
				return 0, nil
			case sig := <-p.signal:
				return 128 + sig, nil
			}
		}
	case "sleep":
		return 128 + <-p.signal, nil
	case "detach":
		f.mu.Lock()
		first := !p.detached
		p.detached = true
		f.mu.Unlock()
		if first {
			return 0, fmt.Errorf("link lost: %w", ErrDetached)
		}
		_, _ = io.WriteString(stdio.Stdout, "again\n")
		return 0, nil
	case "crash":
		f.mu.Lock()
		if bx, ok := f.boxes[name]; ok {
			bx.State, bx.Note = box.StateStopped, "its machine exited: guest kernel panic"
		}
		f.mu.Unlock()
		return 0, fmt.Errorf("link lost: %w", ErrDetached)
	}
	return 127, nil
}

func (f *fakeBoxes) Processes(_ context.Context, name string) ([]agent.ProcessInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.use(name)
	var out []agent.ProcessInfo
	for k, p := range f.procs {
		if strings.HasPrefix(k, name+"/") {
			out = append(out, agent.ProcessInfo{ID: p.spec.ID, Pid: p.pid, Running: p.running, ExitCode: p.code})
		}
	}
	return out, nil
}

func (f *fakeBoxes) SignalProcess(_ context.Context, name, id string, sig int) error {
	p, err := f.proc(name, id)
	if err != nil {
		return err
	}
	select {
	case p.signal <- sig:
	default:
	}
	return nil
}

func (f *fakeBoxes) ResizeProcess(_ context.Context, name, id string, rows, cols int) error {
	p, err := f.proc(name, id)
	if err != nil {
		return err
	}
	f.mu.Lock()
	p.rows, p.cols = rows, cols
	f.mu.Unlock()
	return nil
}

func (f *fakeBoxes) CloseProcessStdin(_ context.Context, name, id string) error {
	p, err := f.proc(name, id)
	if err != nil {
		return err
	}
	p.closeOnce.Do(func() { close(p.stdinEnd) })
	return nil
}

func (f *fakeBoxes) ForgetProcess(_ context.Context, name, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.procs, name+"/"+id)
	return nil
}

// recorder keeps the events the service published.
type recorder struct {
	mu     sync.Mutex
	events []proto.Message
}

func (r *recorder) Publish(ev proto.Message) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, ev)
}

// topics returns the published events' topics, in order.
func (r *recorder) topics() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, ev := range r.events {
		out = append(out, topic(ev))
	}
	return out
}

func (f *fakeBoxes) AddRootfs(_ context.Context, name, id, source string, _ map[string]string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.get(name); err != nil {
		return "", err
	}
	f.rootfs[name+"/"+id] = source
	return daemon.ContainerRoot(id), nil
}

func (f *fakeBoxes) RemoveRootfs(_ context.Context, name, id, _ string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.get(name); err != nil {
		return err
	}
	delete(f.rootfs, name+"/"+id)
	return nil
}
