package agent

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// guestLinks is the agent's end of its link with the host: one link at a time, with the SSH connection over it.
// It lives as long as the agent, so in guest memory: a box restored from a snapshot finds it as it was.
type guestLinks struct {
	mu  sync.Mutex
	cur *Link
}

// errLinkReplaced ends a link the host replaced with a new one (a fork's child, a restarted boxd).
var errLinkReplaced = errors.New("agent: link: the host started a new link")

// serve answers the hello line on channel ch (read through r) and carries the link over ch until it breaks.
// A new link replaces the one before, whose SSH connection ends, and runs its own with ssh in the background.
func (g *guestLinks) serve(ch io.WriteCloser, r io.Reader, line []byte, ssh func(l *Link)) error {
	h, err := parseHello(line)
	if errors.Is(err, errLinkVersion) {
		_, _ = io.WriteString(ch, helloReply{reason: refusedVersion}.line())
		return err
	}
	if err != nil {
		return err
	}
	l, recv, reason, why := g.take(h, ssh)
	if l == nil {
		_, _ = io.WriteString(ch, helloReply{reason: reason}.line())
		return fmt.Errorf("agent: link %s: refused (%s): %w", h.id, reason, why)
	}
	if _, err := io.WriteString(ch, helloReply{ok: true, id: h.id, recv: recv}.line()); err != nil {
		return fmt.Errorf("agent: link: %w", err)
	}
	return l.Run(ch, r, h.recv)
}

// take returns the link hello h asks for, detached from any channel, and what it holds of the host's stream; or
// the reason of a refusal and its detail.
func (g *guestLinks) take(h hello, ssh func(l *Link)) (l *Link, recv uint64, refused string, why error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !h.resume {
		if g.cur != nil {
			g.cur.fail(errLinkReplaced)
		}
		g.cur = newLink(h.id)
		go ssh(g.cur)
		return g.cur, 0, "", nil
	}
	switch {
	case g.cur == nil:
		return nil, 0, refusedUnknown, errors.New("this agent has no link")
	case g.cur.id != h.id:
		return nil, 0, refusedUnknown, fmt.Errorf("this agent's link is %s", g.cur.id)
	case g.cur.done():
		return nil, 0, refusedUnknown, errors.New("the link ended")
	}
	if err := g.cur.canResume(h.recv); err != nil {
		return nil, 0, refusedPosition, err
	}
	return g.cur, g.cur.detach(), "", nil
}
