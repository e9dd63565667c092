package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// The box command's way to the host: the agent serves BoxSocket in the
// guest and carries each request over a ChannelHost channel of its current
// connection to the host.

// links is the agent's connection to the host now, and the forks it was
// told of.
var links = newHostLinks()

type hostLinks struct {
	mu      sync.Mutex
	conn    ssh.Conn
	forkGen uint64 // forks told, ever
	fork    ForkInfo
	changed chan struct{} // closed and replaced at each change
}

func newHostLinks() *hostLinks { return &hostLinks{changed: make(chan struct{})} }

func (l *hostLinks) changedLocked() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// set makes c the connection to the host.
func (l *hostLinks) set(c ssh.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.conn = c
	l.changedLocked()
}

// clear forgets c, if it is still the connection.
func (l *hostLinks) clear(c ssh.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conn == c {
		l.conn = nil
		l.changedLocked()
	}
}

// current waits up to wait for a connection to the host.
func (l *hostLinks) current(ctx context.Context, wait time.Duration) (ssh.Conn, error) {
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		c, changed := l.conn, l.changed
		l.mu.Unlock()
		if c != nil {
			return c, nil
		}
		select {
		case <-changed:
		case <-deadline.C:
			return nil, errors.New("the host is not connected to this box's agent")
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// gen is how many forks were told so far.
func (l *hostLinks) gen() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.forkGen
}

// noteFork records that this guest is fork child f, writing it to file
// (when set) for programs that start later.
func (l *hostLinks) noteFork(f ForkInfo, file string) {
	if file != "" {
		_ = os.MkdirAll(filepath.Dir(file), 0o755)
		text := fmt.Sprintf("BOX_FORK_INDEX=%d\nBOX_FORK_COUNT=%d\nBOX_PARENT=%s\nBOX_NAME=%s\n", f.Index, f.Count, f.Parent, f.Name)
		tmp := file + ".tmp"
		if os.WriteFile(tmp, []byte(text), 0o644) == nil {
			_ = os.Rename(tmp, file)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.forkGen++
	l.fork = f
	l.changedLocked()
}

// waitFork waits up to wait for a fork told after the gen-th, and returns
// it.
func (l *hostLinks) waitFork(gen uint64, wait time.Duration) (ForkInfo, bool) {
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		l.mu.Lock()
		g, f, changed := l.forkGen, l.fork, l.changed
		l.mu.Unlock()
		if g > gen {
			return f, true
		}
		select {
		case <-changed:
		case <-deadline.C:
			return ForkInfo{}, false
		}
	}
}

// Bounds of the box command's requests: how long one waits for a
// connection to the host, and how long a fork's child waits, after the
// host's answer broke off, to be told which child it is.
const (
	hostWait      = 30 * time.Second
	forkChildWait = 5 * time.Minute
)

// ServeBox serves the box command on a unix socket at path until ctx ends.
func ServeBox(ctx context.Context, path string, logf func(string, ...any)) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	_ = os.Remove(path)
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return err
	}
	// Root's alone: the box command acts with the box's authority.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return err
	}
	context.AfterFunc(ctx, func() { l.Close() })
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer conn.Close()
			if err := relayBox(ctx, conn); err != nil && logf != nil {
				logf("box command: %v", err)
			}
		}()
	}
}

// relayBox carries one request of the box command on conn to the host and
// the host's answer back. A fork's request whose answer broke off (the
// guest is a child, restored from the snapshot taken while it waited) is
// answered with the ForkInfo the host tells the child.
func relayBox(ctx context.Context, conn net.Conn) error {
	in := bufio.NewReader(io.LimitReader(conn, maxHostRequest))
	line, err := in.ReadBytes('\n')
	if err != nil {
		return err
	}
	var req HostRequest
	if err := json.Unmarshal(line, &req); err != nil {
		return writeFrame(conn, HostFrame{Error: "box: a bad request: " + err.Error(), Category: "invalid_argument", Done: true})
	}
	gen := links.gen()
	hc, err := links.current(ctx, hostWait)
	if err != nil {
		return writeFrame(conn, HostFrame{Error: "box: " + err.Error(), Category: "unavailable", Done: true})
	}
	ch, reqs, err := hc.OpenChannel(ChannelHost, nil)
	if err != nil {
		return writeFrame(conn, HostFrame{Error: "box: boxd on the host does not answer the box command: " + err.Error(), Category: "not_supported", Done: true})
	}
	go ssh.DiscardRequests(reqs)
	defer ch.Close()
	// The box command going away (^C) ends the request.
	go func() {
		_, _ = io.Copy(io.Discard, conn)
		ch.Close()
	}()
	if _, err := ch.Write(line); err != nil {
		return writeFrame(conn, HostFrame{Error: "box: " + err.Error(), Category: "unavailable", Done: true})
	}
	answers := bufio.NewReader(ch)
	for {
		frame, err := answers.ReadBytes('\n')
		if err != nil {
			break
		}
		if _, err := conn.Write(frame); err != nil {
			return err
		}
		var f HostFrame
		if json.Unmarshal(frame, &f) == nil && f.Done {
			return nil
		}
	}
	if req.Op == OpFork {
		if f, ok := links.waitFork(gen, forkChildWait); ok {
			return writeFrame(conn, HostFrame{Child: &f, Done: true})
		}
	}
	return writeFrame(conn, HostFrame{Error: "box: the link to the host broke off before it answered", Category: "unavailable", Done: true})
}

func writeFrame(w io.Writer, f HostFrame) error {
	return json.NewEncoder(w).Encode(f)
}
