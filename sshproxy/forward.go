package sshproxy

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
)

// The requests and channels of remote forwarding (ssh -R) and agent forwarding (ssh -A). They mirror the agent's
// (agent.RequestTCPIPForward and the rest): the proxy tags each request it relays with its connection's tag, and
// the box puts the tag after the standard fields of each channel it opens back, so that the proxy, which shares
// one backend client among every connection to the box, knows whose channel it is.
const (
	reqTCPIPForward       = "tcpip-forward"
	reqCancelTCPIPForward = "cancel-tcpip-forward"
	reqAuthAgent          = "auth-agent-req@openssh.com"
	chanForwardedTCPIP    = "forwarded-tcpip"
	chanAuthAgent         = "auth-agent@openssh.com"
)

// maxForwards bounds the remote forwards one connection holds.
const maxForwards = 64

// forwardMsg is the payload of tcpip-forward and cancel-tcpip-forward (RFC 4254 section 7.1), and the tag.
type forwardMsg struct {
	Addr string
	Port uint32
	Tag  []byte `ssh:"rest"`
}

// forwardedMsg is the extra data of a forwarded-tcpip channel (RFC 4254 section 7.2), and the tag.
type forwardedMsg struct {
	Addr     string
	Port     uint32
	OrigAddr string
	OrigPort uint32
	Tag      []byte `ssh:"rest"`
}

// forwardKey is a remote forward as the person named it: the address as sent, the port the box listens on.
type forwardKey struct {
	addr string
	port uint32
}

// newTag returns a fresh connection tag.
func newTag() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return hex.EncodeToString(b)
}

// boxLink is the proxy's side of one backend client, shared by every connection to its box: done closes when
// the client's connection ends, and the channels the box opens back are routed by tag to the connection that
// asked for them.
type boxLink struct {
	done chan struct{}

	// mu protects routes.
	mu     sync.Mutex
	routes map[string]*proxyConn // by tag
}

func (l *boxLink) add(c *proxyConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.routes[c.tag] = c
}

func (l *boxLink) remove(c *proxyConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.routes, c.tag)
}

func (l *boxLink) lookup(tag string) *proxyConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.routes[tag]
}

// route hands each channel of type typ the box opens to the connection its tag names, and refuses the rest.
func (l *boxLink) route(typ string, chans <-chan ssh.NewChannel) {
	for nch := range chans {
		var tag string
		var payload []byte
		var key forwardKey
		switch typ {
		case chanForwardedTCPIP:
			var m forwardedMsg
			if ssh.Unmarshal(nch.ExtraData(), &m) != nil {
				_ = nch.Reject(ssh.ConnectionFailed, "malformed forwarded-tcpip channel")
				continue
			}
			tag, key = string(m.Tag), forwardKey{m.Addr, m.Port}
			m.Tag = nil
			payload = ssh.Marshal(m)
		case chanAuthAgent:
			tag = string(nch.ExtraData())
		}
		c := l.lookup(tag)
		if c == nil {
			_ = nch.Reject(ssh.Prohibited, "boxd: no connection asked for this channel")
			continue
		}
		go c.openBack(nch, payload, key)
	}
}

// openBack opens the box's channel nch on the person's connection, if they asked for it (a remote forward they
// hold, agent forwarding on one of their sessions), and relays it.
func (c *proxyConn) openBack(nch ssh.NewChannel, payload []byte, key forwardKey) {
	typ := nch.ChannelType()
	c.mu.Lock()
	asked := c.agent
	if typ == chanForwardedTCPIP {
		_, asked = c.forwards[key]
	}
	c.mu.Unlock()
	if !asked {
		_ = nch.Reject(ssh.Prohibited, "boxd: the connection did not ask for this channel")
		return
	}
	cch, creqs, err := c.person.OpenChannel(typ, payload)
	if err != nil {
		var oerr *ssh.OpenChannelError
		if errors.As(err, &oerr) {
			_ = nch.Reject(oerr.Reason, oerr.Message)
		} else {
			_ = nch.Reject(ssh.ConnectionFailed, "boxd: the person's connection is gone")
		}
		return
	}
	bch, breqs, err := nch.Accept()
	if err != nil {
		_ = cch.Close()
		go ssh.DiscardRequests(creqs)
		return
	}
	c.relay(false, cch, creqs, bch, breqs)
}

// answer answers a global request intake handed on: a forward request relayed to the box, a keepalive no.
func (c *proxyConn) answer(r *ssh.Request, queued *atomic.Int64) {
	if r.Type == reqTCPIPForward || r.Type == reqCancelTCPIPForward {
		c.forwardRequest(r)
	} else {
		_ = r.Reply(false, nil)
	}
	queued.Add(-1)
}

// forwardRequest relays a person's tcpip-forward or cancel-tcpip-forward to the box, with the connection's tag,
// and keeps the forwards the box holds for them.
func (c *proxyConn) forwardRequest(r *ssh.Request) {
	var m forwardMsg
	if ssh.Unmarshal(r.Payload, &m) != nil {
		_ = r.Reply(false, nil)
		return
	}
	m.Tag = []byte(c.tag)
	key := forwardKey{m.Addr, m.Port}
	c.mu.Lock()
	_, held := c.forwards[key]
	n := len(c.forwards)
	c.mu.Unlock()
	switch r.Type {
	case reqTCPIPForward:
		if held || n >= maxForwards {
			_ = r.Reply(false, nil)
			return
		}
		ok, reply, err := c.box.SendRequest(reqTCPIPForward, true, ssh.Marshal(m))
		if err != nil || !ok {
			c.log.Info("ssh remote forward refused by the box", "addr", m.Addr, "port", m.Port, "err", err)
			_ = r.Reply(false, nil)
			return
		}
		if m.Port == 0 {
			var p struct{ Port uint32 }
			if ssh.Unmarshal(reply, &p) != nil || p.Port == 0 {
				_ = r.Reply(false, nil)
				return
			}
			key.port = p.Port
		}
		c.mu.Lock()
		c.forwards[key] = struct{}{}
		c.mu.Unlock()
		c.log.Info("ssh remote forward", "addr", m.Addr, "port", key.port)
		_ = r.Reply(true, reply)
	case reqCancelTCPIPForward:
		if !held {
			c.log.Info("ssh remote forward cancel refused: the connection holds no such forward", "addr", m.Addr, "port", m.Port)
			_ = r.Reply(false, nil)
			return
		}
		ok, _, err := c.box.SendRequest(reqCancelTCPIPForward, true, ssh.Marshal(m))
		if err != nil || !ok {
			c.log.Info("ssh remote forward cancel refused by the box", "addr", m.Addr, "port", m.Port, "err", err)
		}
		c.mu.Lock()
		delete(c.forwards, key)
		c.mu.Unlock()
		_ = r.Reply(ok && err == nil, nil)
	}
}

// dropForwards cancels, on the box, every remote forward the connection still holds: the person is gone.
func (c *proxyConn) dropForwards() {
	c.mu.Lock()
	keys := make([]forwardKey, 0, len(c.forwards))
	for k := range c.forwards {
		keys = append(keys, k)
	}
	c.forwards = map[forwardKey]struct{}{}
	c.mu.Unlock()
	for _, k := range keys {
		m := forwardMsg{Addr: k.addr, Port: k.port, Tag: []byte(c.tag)}
		if _, _, err := c.box.SendRequest(reqCancelTCPIPForward, true, ssh.Marshal(m)); err != nil {
			return // the box's connection is gone, and its listeners with it
		}
	}
}

// agentRequest relays a session's auth-agent-req@openssh.com to the box's session ch with the connection's tag.
func (c *proxyConn) agentRequest(ch ssh.Channel) bool {
	ok, err := ch.SendRequest(reqAuthAgent, true, []byte(c.tag))
	if err != nil || !ok {
		return false
	}
	c.mu.Lock()
	c.agent = true
	c.mu.Unlock()
	return true
}

// intakeItem is a forward request or a channel, in the order the person sent them.
type intakeItem struct {
	req *ssh.Request
	nch ssh.NewChannel
}

// intake reads the person's global requests and channels until both end. It answers at once what needs no box
// (keepalives) and hands the rest to items in the order the person sent them, so that a remote forward asked for
// before a session is in place when the session's command starts, as with OpenSSH's sshd. The ssh package
// delivers requests and channels on separate Go channels, filled by one reader in the order they arrived: once a
// channel is here, every request sent before it is already waiting, so taking those first keeps the order.
//
// SSH matches the replies to global requests by their order, so a keepalive is answered at once only while no
// request handed on waits for its answer (queued counts those; whoever answers one takes it off); otherwise it
// is handed on too, and answered in its turn. An OpenSSH client with ServerAliveInterval sends keepalives while
// its remote forwards wait for a box that resumes: an answer ahead of theirs would be taken for theirs.
func intake(done <-chan struct{}, reqs <-chan *ssh.Request, chans <-chan ssh.NewChannel, items chan<- intakeItem, queued *atomic.Int64) {
	defer close(items)
	give := func(it intakeItem) {
		select {
		case items <- it:
		case <-done:
			if it.req != nil {
				_ = it.req.Reply(false, nil)
				queued.Add(-1)
			} else {
				_ = it.nch.Reject(ssh.ConnectionFailed, "boxd: the connection is closing")
			}
		}
	}
	request := func(r *ssh.Request) {
		switch {
		case r.Type == reqTCPIPForward || r.Type == reqCancelTCPIPForward || (r.WantReply && queued.Load() > 0):
			queued.Add(1)
			give(intakeItem{req: r})
		case r.WantReply:
			_ = r.Reply(false, nil)
		}
	}
	for reqs != nil || chans != nil {
		select {
		case r, ok := <-reqs:
			if !ok {
				reqs = nil
				continue
			}
			request(r)
		case nch, ok := <-chans:
			if !ok {
				chans = nil
				continue
			}
		earlier:
			for reqs != nil {
				select {
				case r, ok := <-reqs:
					if !ok {
						reqs = nil
						break earlier
					}
					request(r)
				default:
					break earlier
				}
			}
			give(intakeItem{nch: nch})
		}
	}
}

// heartbeatEvery is how often heartbeat sends: at most half the shortest ServerAliveInterval an OpenSSH client
// takes (one second).
const heartbeatEvery = 400 * time.Millisecond

// heartbeat sends the person a keepalive that asks for no answer every interval until the returned stop is
// called, once. While a box resumes, an OpenSSH client with ServerAliveInterval then hears from the proxy and sends no
// keepalive of its own, which would have to wait for its answer behind a remote forward's (intake), and end the
// connection after ServerAliveCountMax of them.
func heartbeat(conn ssh.Conn, every time.Duration) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if _, _, err := conn.SendRequest("keepalive@openssh.com", false, nil); err != nil {
					return
				}
			}
		}
	}()
	return func() { close(done) }
}

// refuseItems answers the person when their box cannot be reached: forward requests get no, the first channel
// gets msg (the OpenSSH client prints it); it gives up waiting for a channel after timeout.
func refuseItems(items <-chan intakeItem, queued *atomic.Int64, msg string, timeout time.Duration) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case it, ok := <-items:
			if !ok {
				return
			}
			if it.req != nil {
				_ = it.req.Reply(false, nil)
				queued.Add(-1)
				continue
			}
			_ = it.nch.Reject(ssh.ConnectionFailed, msg)
			return
		case <-t.C:
			return
		}
	}
}
