package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/crypto/ssh"
)

// authAgentSocket is a session's SSH agent socket in the guest (ssh -A): each connection a program makes to it
// becomes a ChannelAuthAgent towards the person's agent. The socket lives in a folder of its own, root's alone,
// as OpenSSH's sshd makes it.
type authAgentSocket struct {
	dir  string
	path string
	l    net.Listener
	conn ssh.Conn
	tag  []byte
	logf func(string, ...any)
	once sync.Once
}

// listenAuthAgent makes a session's agent socket; tag is the request's payload (see RequestAuthAgent).
func listenAuthAgent(conn ssh.Conn, tag []byte, logf func(string, ...any)) (*authAgentSocket, error) {
	if len(tag) > maxTag {
		return nil, fmt.Errorf("agent: auth agent: a tag of %d bytes", len(tag))
	}
	dir, err := os.MkdirTemp("", "ssh-agent-")
	if err != nil {
		return nil, fmt.Errorf("agent: auth agent: %w", err)
	}
	path := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("agent: auth agent: %w", err)
	}
	a := &authAgentSocket{dir: dir, path: path, l: l, conn: conn, tag: bytes.Clone(tag), logf: logf}
	go a.serve()
	return a, nil
}

func (a *authAgentSocket) serve() {
	for {
		c, err := a.l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				a.logf("auth agent %s: %v", a.path, err)
			}
			return
		}
		go func() {
			ch, reqs, err := a.conn.OpenChannel(ChannelAuthAgent, a.tag)
			if err != nil {
				// The person's client forwards no agent, or is gone: the program sees its connection closed.
				c.Close()
				return
			}
			go ssh.DiscardRequests(reqs)
			pipe(c, ch, "auth agent", a.logf)
		}()
	}
}

// Close removes the socket; connections already made go on.
func (a *authAgentSocket) Close() {
	a.once.Do(func() {
		a.l.Close()
		os.RemoveAll(a.dir)
	})
}
