package shim

import (
	"context"
	"fmt"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Exec records an exec of the running task; Start runs it in the box.
func (s *Service) Exec(ctx context.Context, r *taskapi.ExecProcessRequest) (*emptypb.Empty, error) {
	if r.ExecID == "" {
		return nil, fmt.Errorf("an exec needs an id: %w", errdefs.ErrInvalidArgument)
	}
	if r.Spec == nil {
		return nil, fmt.Errorf("exec %s has no process spec: %w", r.ExecID, errdefs.ErrInvalidArgument)
	}
	spec, err := execSpec(r.Spec.Value)
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", r.ExecID, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	init, err := s.process(r.ID, "")
	if err != nil {
		return nil, err
	}
	if init.state != stateRunning {
		return nil, fmt.Errorf("task %s is not running: %w", r.ID, errdefs.ErrFailedPrecondition)
	}
	if _, ok := s.execs[r.ExecID]; ok {
		return nil, fmt.Errorf("exec %s of task %s: %w", r.ExecID, r.ID, errdefs.ErrAlreadyExists)
	}
	spec.Root = s.root
	s.execs[r.ExecID] = newProcess(r.ExecID, s.prefix+ExecPrefix+r.ExecID, spec,
		stdio{stdin: r.Stdin, stdout: r.Stdout, stderr: r.Stderr, terminal: r.Terminal})
	s.cfg.Events.Publish(&eventsapi.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return &emptypb.Empty{}, nil
}

// ResizePty changes the process's terminal size; before its start, the
// size it starts with.
func (s *Service) ResizePty(ctx context.Context, r *taskapi.ResizePtyRequest) (*emptypb.Empty, error) {
	p, state, err := s.beforeStart(r.ID, r.ExecID, func(p *process) { p.spec.Rows, p.spec.Cols = int(r.Height), int(r.Width) })
	if err != nil {
		return nil, err
	}
	if state == stateRunning {
		if err := s.boxes.ResizeProcess(ctx, s.box, p.agentID, int(r.Height), int(r.Width)); err != nil {
			return nil, fmt.Errorf("resizing the terminal of process %s in box %s: %w", p.agentID, s.box, err)
		}
		s.unpausedByUse()
	}
	return &emptypb.Empty{}, nil
}

// CloseIO ends the process's standard input once what its client wrote
// before closing it was passed on; before its start, at its start.
func (s *Service) CloseIO(ctx context.Context, r *taskapi.CloseIORequest) (*emptypb.Empty, error) {
	if !r.Stdin {
		return &emptypb.Empty{}, nil
	}
	p, state, err := s.beforeStart(r.ID, r.ExecID, func(p *process) { p.closeStdin = true })
	if err != nil {
		return nil, err
	}
	if state == stateRunning {
		// A start in progress: the process may not be in the box yet.
		select {
		case <-p.startedOnce:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		s.closeStdin(ctx, p)
	}
	return &emptypb.Empty{}, nil
}

// beforeStart finds process execID of task id and returns its state; set
// changes what it starts with when it has not started yet.
func (s *Service) beforeStart(id, execID string, set func(p *process)) (*process, procState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.process(id, execID)
	if err != nil {
		return nil, 0, err
	}
	if p.state == stateCreated {
		set(p)
	}
	return p, p.state, nil
}

// stdinDrainWait bounds how long closing a process's input waits for
// what came before to be passed on.
const stdinDrainWait = 5 * time.Second

// closeStdin ends running process p's standard input once its stream has
// passed on every byte the client wrote to the fifo.
func (s *Service) closeStdin(ctx context.Context, p *process) {
	s.mu.Lock()
	streams := p.streams
	s.mu.Unlock()
	if streams != nil && streams.stdin != nil {
		deadline := time.Now().Add(stdinDrainWait)
		for in := streams.stdin; !in.passedOn(); {
			if time.Now().After(deadline) {
				s.log.Warn("closing the process's input before all of it was passed on", "process", p.agentID)
				break
			}
			select {
			case <-in.drained:
			case <-p.exited:
				return
			case <-time.After(pollEvery):
				continue
			}
			break
		}
	}
	if err := s.boxes.CloseProcessStdin(ctx, s.box, p.agentID); err != nil {
		s.log.Warn("closing the process's input", "process", p.agentID, "err", err)
	}
	s.unpausedByUse()
}
