package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// ProcessIO is what an attachment to a kept process passes on: Stdin to
// the process's input (nil sends none; its end is not the input's, see
// CloseProcessStdin), its output to Stdout and Stderr (nil discards).
type ProcessIO struct {
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Process starts the kept process spec names (or, with spec.Attach,
// attaches to it) and passes stdio on until its exit status came, after
// all its output was written; it returns the status as Run reports it
// (128+n for a death by signal n).
//
// A process that cannot be started, or an attach to an unknown ID, is an
// error in the agent's category (errdefs.ErrNotFound for an unknown ID or a
// program not found, errdefs.ErrAlreadyExists for an ID in use). When the
// channel or the connection ends first, or ctx ends, the error wraps
// ErrDetached (and errdefs.ErrUnavailable): the process runs on in the
// guest, and a later attach gets what it writes next. A Stdin that is still
// being read then is left to its reader.
func (c *Client) Process(ctx context.Context, spec ProcessSpec, stdio ProcessIO) (exitCode int, err error) {
	what := fmt.Sprintf("agent: process %q", spec.ID)
	extra, err := json.Marshal(spec)
	if err != nil {
		return -1, fmt.Errorf("%s: %w", what, err)
	}
	ch, reqs, err := c.openProcess(ctx, extra)
	if err != nil {
		var oe *ssh.OpenChannelError
		if errors.As(err, &oe) {
			return -1, processRefusal(what, oe.Message)
		}
		return -1, detached(what, err)
	}
	defer ch.Close()
	stop := context.AfterFunc(ctx, func() { _ = ch.Close() })
	defer stop()
	gone := c.detachSignal()
	var out cutOff
	stdout, stderr := out.writer(stdio.Stdout), out.writer(stdio.Stderr)

	go func() {
		if stdio.Stdin != nil {
			_, _ = io.Copy(ch, stdio.Stdin)
		}
		// The channel's end of file lets a close-stdin go on (see
		// CloseProcessStdin); it does not end the process's input.
		_ = ch.CloseWrite()
	}()
	var wg sync.WaitGroup
	var outMu sync.Mutex
	var outErr error
	pass := func(w io.Writer, r io.Reader) {
		defer wg.Done()
		if err := passOutput(w, r); err != nil {
			outMu.Lock()
			outErr = err
			outMu.Unlock()
			_ = ch.Close() // what the agent has not sent waits for the next attach
		}
	}
	wg.Add(2)
	go pass(stdout, ch)
	go pass(stderr, ch.Stderr())

	code, got := -1, false
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		for req := range reqs {
			if req.Type == "exit-status" {
				var m exitStatusMsg
				if ssh.Unmarshal(req.Payload, &m) == nil {
					code, got = int(m.Status), true
				}
			}
			if req.WantReply {
				_ = req.Reply(false, nil)
			}
		}
		wg.Wait()
	}()
	select {
	case <-ended:
	case <-gone:
		out.cut()
		return -1, detached(what, errors.New("the box's machine went away"))
	}
	switch {
	case ctx.Err() != nil:
		return -1, detached(what, context.Cause(ctx))
	case outErr != nil:
		return -1, detached(what, fmt.Errorf("writing its output: %w", outErr))
	case !got:
		return -1, detached(what, errors.New("the channel ended"))
	}
	return code, nil
}

// detachSignal returns what DetachProcesses closes.
func (c *Client) detachSignal() <-chan struct{} {
	c.detachMu.Lock()
	defer c.detachMu.Unlock()
	if c.detach == nil {
		c.detach = make(chan struct{})
	}
	return c.detach
}

// DetachProcesses ends every Process call in progress at once, as the end of its channel would (ErrDetached),
// for a box whose machine goes away while its link waits (a hibernation): the kept processes go on when the box
// comes back, and a later attach gets what they write next.
func (c *Client) DetachProcesses() {
	c.detachMu.Lock()
	defer c.detachMu.Unlock()
	if c.detach != nil {
		close(c.detach)
		c.detach = nil
	}
}

// cutOff passes output on to its writers until cut, then drops it: a Process call that returned writes no more.
type cutOff struct {
	mu  sync.Mutex
	off bool
}

func (c *cutOff) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.off = true
}

// writer returns w (nil discards) behind c.
func (c *cutOff) writer(w io.Writer) io.Writer {
	if w == nil {
		w = io.Discard
	}
	return writerFunc(func(p []byte) (int, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if c.off {
			return len(p), nil
		}
		return w.Write(p)
	})
}

// writerFunc is a function as an io.Writer.
type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// passOutput copies what the agent sent on r to w (nil discards) until r
// has no more, and returns w's error. A read that fails with bytes (the
// window's adjustment failed: the connection is gone) is not the end: what
// arrived before the link broke is passed on all the same.
func passOutput(w io.Writer, r io.Reader) error {
	if w == nil {
		w = io.Discard
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err != nil && n == 0 {
			return nil
		}
	}
}

// openProcess opens a ProcessChannel with extra data extra, or gives up
// when ctx ends (a channel opened later is closed).
func (c *Client) openProcess(ctx context.Context, extra []byte) (ssh.Channel, <-chan *ssh.Request, error) {
	type channel struct {
		ch   ssh.Channel
		reqs <-chan *ssh.Request
	}
	o, err := beforeDone(ctx, func() (channel, error) {
		ch, reqs, err := c.ssh.OpenChannel(ProcessChannel, extra)
		return channel{ch, reqs}, err
	}, func(o channel) {
		_ = o.ch.Close()
		go ssh.DiscardRequests(o.reqs)
	})
	return o.ch, o.reqs, err
}

// detached is the error of an attachment that ended before the exit status.
func detached(what string, cause error) error {
	return errcat.With(fmt.Errorf("%s: %w (%w)", what, ErrDetached, cause), errdefs.ErrUnavailable)
}

// Processes lists the kept processes of the guest, by ID.
func (c *Client) Processes(ctx context.Context) ([]ProcessInfo, error) {
	reply, err := c.processRequest(ctx, ProcessesRequest, "agent: processes", nil)
	if err != nil {
		return nil, err
	}
	var out []ProcessInfo
	if err := json.Unmarshal(reply, &out); err != nil {
		return nil, fmt.Errorf("agent: processes: %w", err)
	}
	return out, nil
}

// SignalProcess sends Linux signal sig to kept process id (with a
// terminal, to its process group). An unknown id, or one that has exited,
// is an error wrapping errdefs.ErrNotFound.
func (c *Client) SignalProcess(ctx context.Context, id string, sig int) error {
	_, err := c.processRequest(ctx, SignalProcessRequest, fmt.Sprintf("agent: signal process %q", id), ProcessSignal{ID: id, Signal: sig})
	return err
}

// ResizeProcess changes kept process id's terminal to rows x cols; a
// process without a terminal is an error wrapping
// errdefs.ErrFailedPrecondition.
func (c *Client) ResizeProcess(ctx context.Context, id string, rows, cols int) error {
	_, err := c.processRequest(ctx, ResizeProcessRequest, fmt.Sprintf("agent: resize process %q", id), ProcessResize{ID: id, Rows: rows, Cols: cols})
	return err
}

// CloseProcessStdin ends kept process id's input; input an attachment sent
// before its Stdin ended reaches the process first. With a terminal, the
// terminal's end of file character (^D) is written, and later input is
// dropped.
func (c *Client) CloseProcessStdin(ctx context.Context, id string) error {
	_, err := c.processRequest(ctx, CloseStdinRequest, fmt.Sprintf("agent: close the input of process %q", id), ProcessRef{ID: id})
	return err
}

// ForgetProcess kills kept process id if it runs (SIGKILL) and forgets it
// and its exit status; its ID may then be used again.
func (c *Client) ForgetProcess(ctx context.Context, id string) error {
	_, err := c.processRequest(ctx, ForgetProcessRequest, fmt.Sprintf("agent: forget process %q", id), ProcessRef{ID: id})
	return err
}

// processRequest sends global request name with payload in JSON (none when
// nil) and returns the reply's payload; a refusal is the agent's error in
// its category, a broken connection errdefs.ErrUnavailable.
func (c *Client) processRequest(ctx context.Context, name, what string, payload any) ([]byte, error) {
	var p []byte
	if payload != nil {
		var err error
		if p, err = json.Marshal(payload); err != nil {
			return nil, fmt.Errorf("%s: %w", what, err)
		}
	}
	ok, reply, err := c.request(ctx, name, p)
	if err != nil {
		return nil, errcat.With(fmt.Errorf("%s: %w", what, err), errdefs.ErrUnavailable)
	}
	if !ok {
		if len(reply) == 0 {
			return nil, fmt.Errorf("%s: the agent does not keep processes: %w", what, errdefs.ErrNotImplemented)
		}
		return nil, processRefusal(what, string(reply))
	}
	return reply, nil
}
