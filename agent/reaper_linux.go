package agent

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reaper reaps every child of the process, as PID 1 must: orphans re-parented to it would otherwise stay zombies.
// The commands the agent starts are reaped in the same place, and their exit status handed to whoever waits for
// them, so no exit status is stolen: all waiting happens here, and nothing else in the process may wait for
// children (os/exec's Wait, os.Process.Wait) while a Reaper runs.
type Reaper struct {
	// mu is held across each start and the registration of its pid, and across each round of reaping, so a
	// child that exits at once is never reaped before it is registered.
	mu sync.Mutex
	// waiting maps the pid of each started command to where its exit status goes.
	waiting map[int]chan unix.WaitStatus
	// wake asks for a round of reaping; SIGCHLD and tests send on it.
	wake chan os.Signal
}

// NewReaper returns a Reaper; Run makes it work.
func NewReaper() *Reaper {
	return &Reaper{waiting: map[int]chan unix.WaitStatus{}, wake: make(chan os.Signal, 1)}
}

// Run reaps children whenever one exits, until ctx ends.
func (r *Reaper) Run(ctx context.Context) {
	signal.Notify(r.wake, unix.SIGCHLD)
	defer signal.Stop(r.wake)
	for {
		r.reap()
		select {
		case <-ctx.Done():
			return
		case <-r.wake:
		}
	}
}

// reap collects every child that has exited and hands the status of registered ones over.
func (r *Reaper) reap() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return // ECHILD: no children; 0: none has exited
		}
		if ch, ok := r.waiting[pid]; ok {
			ch <- ws // buffered: never blocks
			delete(r.waiting, pid)
		}
	}
}

// start runs startFn, which starts one process, and registers it; the returned channel gets its exit status.
func (r *Reaper) start(startFn func() (*os.Process, error)) (*os.Process, <-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, err := startFn()
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiting[p.Pid] = ch
	return p, ch, nil
}

// startProcess starts a process and returns a function that waits for its exit status: through the Reaper when
// there is one, else with wait on the process alone.
func startProcess(r *Reaper, name string, argv []string, attr *os.ProcAttr) (*os.Process, func() unix.WaitStatus, error) {
	if r == nil {
		p, err := os.StartProcess(name, argv, attr)
		if err != nil {
			return nil, nil, err
		}
		return p, func() unix.WaitStatus {
			st, err := p.Wait()
			if err != nil {
				// Only if the process was reaped elsewhere, against the rules: report a failure.
				return unix.WaitStatus(1 << 8)
			}
			return unix.WaitStatus(st.Sys().(syscall.WaitStatus))
		}, nil
	}
	p, ch, err := r.start(func() (*os.Process, error) { return os.StartProcess(name, argv, attr) })
	if err != nil {
		return nil, nil, err
	}
	return p, func() unix.WaitStatus {
		ws := <-ch
		_ = p.Release()
		return ws
	}, nil
}
