package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

// errNoLink is an agent that answered the link's hello with an SSH version line: one older than the link.
var errNoLink = errcat.With(errors.New("agent: the agent speaks no link (an older agent)"), errdefs.ErrNotImplemented)

// startLink starts a new link on channel conn, positioned after the preamble, and carries it over conn, then
// over the channels a redialer dials at socketPath (or where Move says) whenever one breaks.
func startLink(conn net.Conn, socketPath string) (*Link, *redialer, error) {
	id, err := newLinkID()
	if err != nil {
		return nil, nil, fmt.Errorf("agent: link: %w", err)
	}
	rep, rd, err := linkHello(conn, hello{id: id})
	if err != nil {
		return nil, nil, err
	}
	if rep.recv != 0 {
		return nil, nil, fmt.Errorf("agent: link %s: a new link that holds %d bytes: %w", id, rep.recv, errdefs.ErrFailedPrecondition)
	}
	l := newLink(id)
	r := &redialer{link: l, socket: socketPath, kick: make(chan struct{}, 1), changed: make(chan struct{})}
	go r.run(conn, rd, rep.recv, socketPath)
	return l, r, nil
}

// linkHello sends h on conn and returns the guest's reply and a reader positioned after it. A refusal is an error
// of its category: an unknown link errdefs.ErrNotFound, a position the link cannot go on from
// errdefs.ErrFailedPrecondition, another version errdefs.ErrNotImplemented.
func linkHello(conn net.Conn, h hello) (helloReply, *bufio.Reader, error) {
	if _, err := io.WriteString(conn, h.line()); err != nil {
		return helloReply{}, nil, fmt.Errorf("agent: link: %w", err)
	}
	br := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLinkLine(br)
	if err != nil {
		return helloReply{}, nil, fmt.Errorf("agent: link: %w", err)
	}
	if bytes.HasPrefix(line, []byte("SSH-")) {
		return helloReply{}, nil, errNoLink
	}
	rep, err := parseReply(line)
	switch {
	case err != nil:
		return helloReply{}, nil, err
	case !rep.ok:
		cat := map[string]error{refusedUnknown: errdefs.ErrNotFound, refusedPosition: errdefs.ErrFailedPrecondition,
			refusedVersion: errdefs.ErrNotImplemented}[rep.reason]
		return helloReply{}, nil, fmt.Errorf("agent: link %s: the agent refused it (%s): %w", h.id, rep.reason, cat)
	case rep.id != h.id:
		return helloReply{}, nil, fmt.Errorf("agent: link %s: the agent answered for link %s: %w", h.id, rep.id, errdefs.ErrInvalidArgument)
	}
	return rep, br, nil
}

// readLinkLine reads one line of at most maxLinkLine bytes, with its '\n'.
func readLinkLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for len(line) < maxLinkLine {
		c, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		line = append(line, c)
		if c == '\n' {
			return line, nil
		}
	}
	return line, nil // too long: parsing refuses it
}

// redialer gives a host's link channel after channel: when one breaks it dials the agent's socket again and
// resumes the link, until the link closes or the agent refuses it.
type redialer struct {
	link *Link
	kick chan struct{} // wakes a pause between attempts

	// mu protects the fields below; changed is closed and replaced whenever they change.
	mu      sync.Mutex
	socket  string             // where to dial
	on      string             // the socket of the channel that carries the link now; "" between channels
	err     error              // why the link ended
	cancel  context.CancelFunc // ends the attempt in progress
	changed chan struct{}
	conn    net.Conn                       // the channel that carries the link now; nil between channels
	moved   bool                           // move broke the channel: its end was asked for
	onBreak func(socket string, err error) // told of each channel that broke unasked
}

// run carries the link over conn (read through rd, dialled at socket), then over each channel next gives.
func (r *redialer) run(conn net.Conn, rd io.Reader, peerRecv uint64, socket string) {
	for {
		var runErr error
		if r.carry(socket, conn) {
			runErr = r.link.Run(conn, rd, peerRecv)
		}
		if r.link.done() {
			r.end(ErrLinkClosed)
			return
		}
		r.mu.Lock()
		asked, onBreak := r.moved, r.onBreak
		r.moved = false
		r.noteLocked("", nil, nil)
		r.mu.Unlock()
		if !asked && onBreak != nil {
			onBreak(socket, runErr)
		}
		var err error
		if r.nowhere() {
			err = errcat.With(errors.New("agent: link: its channel ended, and there is no socket to dial again"), errdefs.ErrUnavailable)
		} else {
			conn, rd, peerRecv, socket, err = r.next()
		}
		if err != nil {
			r.link.fail(err)
			r.end(err)
			return
		}
	}
}

// nowhere says whether the link has no socket to dial (NewClient's, never moved).
func (r *redialer) nowhere() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.socket == ""
}

// carry notes conn, dialled at socket, as the link's channel, unless Move has asked for another socket since it
// was dialled: then conn is closed unused, as a channel Move broke.
func (r *redialer) carry(socket string, conn net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.socket != socket {
		r.moved = true
		conn.Close()
		return false
	}
	r.noteLocked(socket, conn, nil)
	return true
}

// end notes that the link ended, for err.
func (r *redialer) end(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.noteLocked("", nil, err)
}

// noteLocked sets the channel that carries the link (its socket and conn; "" and nil between channels) and why
// the link ended, and wakes wait. The caller holds mu.
func (r *redialer) noteLocked(on string, conn net.Conn, err error) {
	r.on, r.conn, r.err = on, conn, err
	close(r.changed)
	r.changed = make(chan struct{})
}

// next dials until a channel resumes the link. A refusal is final; so is a link closed meanwhile.
func (r *redialer) next() (net.Conn, io.Reader, uint64, string, error) {
	pause, timeout := dialRetryMin, AttemptTimeout
	for {
		if r.link.done() {
			return nil, nil, 0, "", ErrLinkClosed
		}
		r.mu.Lock()
		socket := r.socket
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		r.cancel = cancel
		r.mu.Unlock()
		if socket != "" {
			conn, rd, recv, err := resumeLink(ctx, socket, r.link)
			cancel()
			switch {
			case err == nil:
				return conn, rd, recv, socket, nil
			case errdefs.IsNotFound(err), errdefs.IsFailedPrecondition(err), errdefs.IsNotImplemented(err):
				return nil, nil, 0, "", err
			case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
				timeout = min(2*timeout, MaxAttemptTimeout)
			}
		}
		cancel()
		select {
		case <-r.kick:
			pause = dialRetryMin
		case <-time.After(pause):
			pause = min(2*pause, dialRetryMax)
		}
	}
}

// resumeLink dials socket and resumes l over it, bounded by ctx.
func resumeLink(ctx context.Context, socket string, l *Link) (net.Conn, io.Reader, uint64, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, nil, 0, err
	}
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	pc, err := syncClient(conn)
	var rep helloReply
	var rd *bufio.Reader
	if err == nil {
		rep, rd, err = linkHello(pc, hello{resume: true, id: l.id, recv: l.received()})
	}
	if err == nil {
		err = l.canResume(rep.recv)
	}
	if !stop() && err == nil {
		err = context.Cause(ctx)
	}
	if err == nil {
		err = conn.SetDeadline(time.Time{})
	}
	if err != nil {
		conn.Close()
		return nil, nil, 0, err
	}
	return conn, rd, rep.recv, nil
}

// move makes socket where the link's channels come from, breaks the one it has, and waits until a channel from
// socket carries it.
func (r *redialer) move(ctx context.Context, socket string) error {
	r.mu.Lock()
	r.socket = socket
	if r.on != "" && r.on != socket {
		// The channel that carries the link is broken here, under mu, so that one the link is about to run
		// over is too: closed before Run starts, it fails at once. A channel dialled at the old socket and not
		// carried yet is closed by carry.
		r.moved = true
		r.conn.Close()
	}
	r.mu.Unlock()
	r.interrupt()
	return r.wait(ctx, socket)
}

// wait waits until a channel from socket carries the link, or the link ends, or ctx ends.
func (r *redialer) wait(ctx context.Context, socket string) error {
	for {
		r.mu.Lock()
		on, err, changed := r.on, r.err, r.changed
		r.mu.Unlock()
		switch {
		case err != nil:
			return err
		case on == socket:
			return nil
		}
		select {
		case <-ctx.Done():
			return errcat.With(fmt.Errorf("agent: link %s: no channel from %s: %w", r.link.id, socket, context.Cause(ctx)), errdefs.ErrUnavailable)
		case <-changed:
		}
	}
}

// interrupt ends the attempt in progress and the pause after it: the link closed, or its socket changed.
func (r *redialer) interrupt() {
	r.mu.Lock()
	if r.cancel != nil {
		r.cancel()
	}
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// OnChannelBreak has f called, from the link's own goroutine, with the socket and the error of each channel that
// breaks without Move asking for it, before the client dials the socket again: for a log of why a box's link
// moved. f must not block.
func (c *Client) OnChannelBreak(f func(socket string, err error)) {
	if c.redial == nil {
		return
	}
	c.redial.mu.Lock()
	c.redial.onBreak = f
	c.redial.mu.Unlock()
}

// Move resumes the client's link over the agent socket at socketPath, for a box whose machine changed (restored
// into another QEMU, carried on by a spare), and returns once the link runs over it: what was sent both ways
// meanwhile is delivered, and SSH sessions go on. An agent that does not know the link (it booted afresh), or
// holds a part of it the client no longer has, is an error that wraps errdefs.ErrNotFound or
// errdefs.ErrFailedPrecondition, and the client is closed; a client without the link (an older agent) cannot
// move (errdefs.ErrNotImplemented).
func (c *Client) Move(ctx context.Context, socketPath string) error {
	if c.link == nil {
		return errcat.With(errors.New("agent: move: the connection has no link"), errdefs.ErrNotImplemented)
	}
	if err := c.redial.move(ctx, socketPath); err != nil {
		if !errdefs.IsUnavailable(err) {
			c.Close()
		}
		return fmt.Errorf("agent: move: %w", err)
	}
	return nil
}
