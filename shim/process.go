package shim

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/containerd/errdefs"
)

// A process's life, each step once, in this order:
//
//	created --start--> running --its stream ends--> exited --Delete--> (forgotten)
//	created --Kill------------------------------> exited
//
// A process that exited keeps its status until Delete. The exit is
// recorded only after every byte of its output was written to its fifos
// and they were closed, and only after Start has published TaskStart.
type procState int

const (
	stateCreated procState = iota
	stateRunning
	stateExited
)

// process is the init process or an exec of the task. The service's mu
// protects its fields but the ones set at creation (execID, agentID, io).
type process struct {
	execID  string // "" for init
	agentID string // its kept process's id in the box
	io      stdio

	spec        agent.ProcessSpec
	state       procState
	pid         uint32
	status      uint32
	exitedAt    time.Time
	restored    bool          // init of a box made from a checkpoint: it runs there already
	closeStdin  bool          // CloseIO came before the start
	streams     *openStreams  // while it runs
	exited      chan struct{} // closed once it exited
	startedOnce chan struct{} // closed once Start published TaskStart
}

func newProcess(execID, agentID string, spec agent.ProcessSpec, io stdio) *process {
	spec.ID = agentID
	spec.Terminal = io.terminal
	return &process{execID: execID, agentID: agentID, spec: spec, io: io,
		exited: make(chan struct{}), startedOnce: make(chan struct{})}
}

// Limits of the link to a kept process that detached: how long the
// stream may be re-attached, and how long a start waits for the process
// to appear in the box.
const (
	reattachFor   = 2 * time.Minute
	reattachDelay = 500 * time.Millisecond
	startTimeout  = time.Minute
	pollEvery     = 20 * time.Millisecond
)

// stream runs p's kept process in the box (or attaches to it) until it
// exits, and returns its exit status. A link that breaks is re-attached;
// a box that stopped under the process (its guest crashed, its machine
// was killed) ends it with status 255 and the reason in the log. A stream
// that fails otherwise also ends it with 255, and *failed says why.
func (s *Service) stream(ctx context.Context, p *process, spec agent.ProcessSpec, io ProcessIO, failed *error) uint32 {
	var lostSince time.Time
	for {
		code, err := s.boxes.ProcessStream(ctx, s.box, spec, io)
		if err == nil {
			return uint32(code)
		}
		if spec.Attach && errors.Is(err, errdefs.ErrNotFound) {
			s.log.Error("the container's box lost its process: its machine was restarted", "process", p.agentID, "box", s.box, "err", err)
			*failed = err
			return 255
		}
		if !errors.Is(err, ErrDetached) {
			s.log.Error("the process's stream failed", "process", p.agentID, "box", s.box, "err", err)
			*failed = err
			return 255
		}
		if lostSince.IsZero() {
			lostSince = time.Now()
		}
		// A re-attach is a use of the box, which boots a stopped one: first
		// give the daemon a moment to see a machine that exited.
		select {
		case <-ctx.Done():
			return 255
		case <-time.After(reattachDelay):
		}
		if reason := s.boxGone(ctx); reason != "" {
			s.log.Error("the container's box stopped under its process", "process", p.agentID, "box", s.box, "reason", reason)
			*failed = fmt.Errorf("box %s: %s: %w", s.box, reason, errdefs.ErrUnavailable)
			return 255
		}
		if time.Since(lostSince) > reattachFor {
			s.log.Error("cannot re-attach to the process", "process", p.agentID, "box", s.box, "err", err)
			return 255
		}
		s.log.Warn("re-attaching to the process", "process", p.agentID, "box", s.box, "err", err)
		spec = agent.ProcessSpec{ID: p.agentID, Attach: true}
	}
}

// boxGone says why the box cannot run the process any more, or "" while
// it may.
func (s *Service) boxGone(ctx context.Context) string {
	bx, err := s.boxes.Get(ctx, s.box)
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		return "the box was removed"
	case err != nil:
		return "" // the daemon may be restarting
	case bx.State == box.StateStopped:
		if bx.Note != "" {
			return "the box stopped: " + bx.Note
		}
		return "the box stopped"
	}
	return ""
}

// findPid waits until p's kept process is listed in the box and returns
// its pid there; ended is closed when the stream ended, with *failed
// saying why when it failed (the process could not start).
func (s *Service) findPid(ctx context.Context, p *process, ended <-chan struct{}, failed *error) (uint32, error) {
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	for {
		// A process that ended before the listing is in it, kept with its
		// status; one that ended and is not never started.
		endedBefore := false
		select {
		case <-ended:
			endedBefore = true
		default:
		}
		list, err := s.boxes.Processes(ctx, s.box)
		if err == nil {
			for _, info := range list {
				if info.ID == p.agentID {
					return uint32(info.Pid), nil
				}
			}
		}
		if endedBefore {
			if *failed != nil {
				return 0, fmt.Errorf("starting process %s in box %s: %w", p.agentID, s.box, *failed)
			}
			return 0, fmt.Errorf("process %s did not start in box %s (see the shim's log): %w", p.agentID, s.box, errdefs.ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("process %s did not appear in box %s within %v: %w", p.agentID, s.box, startTimeout, errdefs.ErrUnavailable)
		case <-ended:
		case <-time.After(pollEvery):
		}
	}
}
