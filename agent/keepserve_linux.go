package agent

import (
	"encoding/json"
	"fmt"

	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// process serves a ProcessChannel: it starts the kept process its spec
// names, or finds it for an attach, and attaches the channel to it. A
// process that cannot be started (a bad spec, a duplicate ID, a program
// not found or not executable) rejects the channel with the reason (see
// processFailure), as a session's refused exec fails its request; an
// attach to an unknown ID does the same.
func (s *server) process(nch ssh.NewChannel) {
	var spec ProcessSpec
	if err := json.Unmarshal(nch.ExtraData(), &spec); err != nil {
		err = fmt.Errorf("agent: a process channel's spec: %w: %w", errdefs.ErrInvalidArgument, err)
		_ = nch.Reject(ssh.Prohibited, processFailure(err))
		return
	}
	var k *kept
	var err error
	if spec.Attach {
		k, err = s.cfg.kept.lookup(spec.ID)
	} else {
		k, err = s.cfg.kept.start(s.cfg, spec)
	}
	if err != nil {
		s.cfg.logf("process %q: %v", spec.ID, err)
		_ = nch.Reject(ssh.ConnectionFailed, processFailure(err))
		return
	}
	ch, reqs, err := nch.Accept()
	if err != nil {
		return // the process runs on, for the next attach
	}
	k.attach(ch, reqs)
}

// processRequest answers a global request on the kept processes: the
// reply's payload, or the error to reply with.
func (s *server) processRequest(req *ssh.Request) ([]byte, error) {
	t := &s.cfg.kept
	if req.Type == ProcessesRequest {
		return json.Marshal(t.list())
	}
	var p struct {
		ID     string `json:"id"`
		Signal int    `json:"signal"`
		Rows   int    `json:"rows"`
		Cols   int    `json:"cols"`
	}
	if err := json.Unmarshal(req.Payload, &p); err != nil {
		return nil, fmt.Errorf("agent: %s: %w: %w", req.Type, errdefs.ErrInvalidArgument, err)
	}
	if req.Type == ForgetProcessRequest {
		k, err := t.remove(p.ID)
		if err != nil {
			return nil, err
		}
		k.forget()
		return nil, nil
	}
	k, err := t.lookup(p.ID)
	if err != nil {
		return nil, err
	}
	switch req.Type {
	case SignalProcessRequest:
		err = k.signal(p.Signal)
	case ResizeProcessRequest:
		err = k.resize(p.Rows, p.Cols)
	case CloseStdinRequest:
		k.closeStdin()
	}
	return nil, err
}
