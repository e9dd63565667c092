package sshproxy

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// proxyConn relays one person's channels to one box, and the channels the
// box opens back for them.
type proxyConn struct {
	name    string
	box     *ssh.Client
	boxDone <-chan struct{} // closed when the box's connection ends
	person  ssh.Conn
	tag     string // names the connection to the box (see boxLink)
	log     *slog.Logger

	// mu protects the fields below.
	mu sync.Mutex
	// sessions: one channel per session relay, closed once the relay has
	// told the person everything it will tell them.
	sessions map[chan struct{}]struct{}
	// forwards are the remote forwards the box holds for the person.
	forwards map[forwardKey]struct{}
	// agent is set once a session of the person's forwards their agent.
	agent bool
}

// refusedRequests are session requests answered "no" here: X11 forwarding
// is not relayed.
var refusedRequests = map[string]bool{"x11-req": true}

// startRequests begin a session's program; the person's data waits for
// the box to have one, so the box sees data and EOF after it, as sent.
var startRequests = map[string]bool{"shell": true, "exec": true, "subsystem": true}

const (
	// probeTimeout bounds the check whether a box whose session ended
	// without an exit status is still there.
	probeTimeout = 5 * time.Second
	// closeGrace is how long a box has to confirm closing a channel.
	closeGrace = 5 * time.Second
)

func (c *proxyConn) handleChannel(nch ssh.NewChannel) {
	typ := nch.ChannelType()
	switch typ {
	case "session", "direct-tcpip":
	default:
		_ = nch.Reject(ssh.UnknownChannelType, fmt.Sprintf("boxd: channel type %q is not supported", typ))
		return
	}
	bch, breqs, err := c.box.OpenChannel(typ, nch.ExtraData())
	if err != nil {
		var oerr *ssh.OpenChannelError
		if errors.As(err, &oerr) {
			_ = nch.Reject(oerr.Reason, oerr.Message)
			return
		}
		c.log.Warn("ssh open channel on box failed", "type", typ, "err", err)
		_ = nch.Reject(ssh.ConnectionFailed, fmt.Sprintf("boxd: lost the connection to box %s", c.name))
		return
	}
	cch, creqs, err := nch.Accept()
	if err != nil {
		_ = bch.Close()
		go ssh.DiscardRequests(breqs)
		return
	}
	c.relay(typ == "session", cch, creqs, bch, breqs)
}

// relay copies one channel pair until both ends are closed. The box's side
// decides the end: once the box has sent all its data and closed, the
// person gets EOF, then exit-status, then the close (a forwarded
// connection, not a session, passes the box's EOF on at once: it may be
// half closed). A person who closes
// first closes the box's channel; a box that does not confirm within
// closeGrace is left behind (its goroutines end with the box's connection),
// so a hung box cannot hold up the proxy's Close.
func (c *proxyConn) relay(session bool, cch ssh.Channel, creqs <-chan *ssh.Request, bch ssh.Channel, breqs <-chan *ssh.Request) {
	told := make(chan struct{})
	if session {
		c.mu.Lock()
		c.sessions[told] = struct{}{}
		c.mu.Unlock()
		defer func() {
			c.mu.Lock()
			delete(c.sessions, told)
			c.mu.Unlock()
		}()
	}

	// Person → box: requests, and data once the box has a program.
	started := make(chan struct{})
	personGone := make(chan struct{})
	// A start request's answer must reach the person before the box's
	// exit status and close do: a short program ends before the proxy has
	// passed the box's answer on, and a person whose channel closes while
	// it waits for the answer sees the start fail.
	var answer pendingAnswer
	go func() {
		var once sync.Once
		start := func() { once.Do(func() { close(started) }) }
		if !session {
			start()
		}
		for r := range creqs {
			if refusedRequests[r.Type] {
				_ = r.Reply(false, nil)
				continue
			}
			if session && r.Type == reqAuthAgent {
				ok := c.agentRequest(bch)
				if r.WantReply {
					_ = r.Reply(ok, nil)
				}
				continue
			}
			done := func() {}
			if startRequests[r.Type] {
				done = answer.begin()
			}
			ok, err := bch.SendRequest(r.Type, r.WantReply, r.Payload)
			if r.WantReply {
				_ = r.Reply(ok && err == nil, nil)
			}
			done()
			if startRequests[r.Type] {
				start()
			}
		}
		start()
		_ = bch.Close()
		close(personGone)
	}()
	go func() {
		<-started
		copyBoth(bch, cch)
		_ = bch.CloseWrite()
	}()

	// Box → person: data, then exit-status and the like after the data.
	go func() {
		defer close(told)
		dataDone := make(chan struct{})
		go func() {
			copyBoth(cch, bch)
			if !session {
				// A forwarded connection may be half closed: the
				// person learns of the box's end of file at once.
				_ = cch.CloseWrite()
			}
			close(dataDone)
		}()
		exited := false
		for r := range breqs {
			if r.Type == "exit-status" || r.Type == "exit-signal" {
				<-dataDone
				answer.wait()
				exited = true
			}
			ok, err := cch.SendRequest(r.Type, r.WantReply, r.Payload)
			if r.WantReply {
				_ = r.Reply(ok && err == nil, nil)
			}
		}
		<-dataDone
		if session && !exited && c.boxLost() {
			_, _ = fmt.Fprintf(cch.Stderr(), "boxd: lost the connection to box %s\r\n", c.name)
		}
		answer.wait()
		if session {
			_ = cch.CloseWrite()
		}
		_ = cch.Close()
	}()

	select {
	case <-told:
	case <-personGone:
		t := time.NewTimer(closeGrace)
		defer t.Stop()
		select {
		case <-told:
		case <-t.C:
			c.log.Warn("box did not close a channel the person closed; leaving it")
		}
	}
}

// pendingAnswer is a start request on its way to the box, whose answer the
// person has not had yet.
type pendingAnswer struct {
	mu      sync.Mutex
	waiting chan struct{} // nil: none
}

// begin notes a request on its way; the function it returns is called
// once the person has the answer.
func (a *pendingAnswer) begin() func() {
	ch := make(chan struct{})
	a.mu.Lock()
	a.waiting = ch
	a.mu.Unlock()
	return func() { close(ch) }
}

// wait returns once the person has the answer to the request on its way,
// if any: soon, since the box answers a request before what follows it,
// or its channel ends, which ends the request too. It gives up after
// closeGrace all the same.
func (a *pendingAnswer) wait() {
	a.mu.Lock()
	ch := a.waiting
	a.mu.Unlock()
	if ch == nil {
		return
	}
	t := time.NewTimer(closeGrace)
	defer t.Stop()
	select {
	case <-ch:
	case <-t.C:
	}
}

// copyBoth copies data and extended data (stderr) from src to dst until
// both reach EOF or fail.
func copyBoth(dst, src ssh.Channel) {
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = io.Copy(dst, src) })
	wg.Go(func() { _, _ = io.Copy(dst.Stderr(), src.Stderr()) })
	wg.Wait()
}

// boxLost reports whether the box's connection is gone (or not answering),
// for a session the box ended without an exit status.
func (c *proxyConn) boxLost() bool {
	select {
	case <-c.boxDone:
		return true
	default:
	}
	res := make(chan error, 1)
	go func() {
		_, _, err := c.box.SendRequest("keepalive@openssh.com", true, nil)
		res <- err
	}()
	t := time.NewTimer(probeTimeout)
	defer t.Stop()
	select {
	case <-c.boxDone:
		return true
	case err := <-res:
		return err != nil
	case <-t.C:
		return true
	}
}

// drainSessions waits, up to timeout, until every session relay running
// now has told its person what happened.
func (c *proxyConn) drainSessions(timeout time.Duration) {
	c.mu.Lock()
	pending := make([]chan struct{}, 0, len(c.sessions))
	for s := range c.sessions {
		pending = append(pending, s)
	}
	c.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	for _, s := range pending {
		select {
		case <-s:
		case <-t.C:
			return
		}
	}
}
