package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// DefaultHandshakeTimeout bounds a server handshake when ServerConfig leaves it zero: long enough for a slow
// guest under TCG, short enough that a host that connected and went silent does not hold the port for long.
const DefaultHandshakeTimeout = 30 * time.Second

// ServerConfig is what Serve needs besides the connection.
type ServerConfig struct {
	// HostKey is the server's key; nil makes a fresh one per connection (see NewHostKey).
	HostKey ssh.Signer
	// System applies Unique requests to the machine; nil refuses them.
	System System
	// Reaper, when not nil, reaps every child of the process and hands commands their exit status (PID 1 must
	// reap orphans). Nil waits for each command on its own, and leaves other children alone.
	Reaper *Reaper
	// HandshakeTimeout bounds the SSH handshake; zero is DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// ForkFile, when set, is where a fork's child's ForkInfo is written
	// (the agent's is agent.ForkFile).
	ForkFile string
	// kept is the kept processes, which every connection served with this
	// configuration shares (see process.go).
	kept keptTable
	// links is the agent's end of its link with the host, which every channel served with this configuration
	// shares (see linkserve.go).
	links guestLinks
	// Logf, when not nil, receives one line per notable event (a session that failed to start, a failed
	// handshake).
	Logf func(format string, args ...any)
}

func (cfg *ServerConfig) logf(format string, args ...any) {
	if cfg.Logf != nil {
		cfg.Logf(format, args...)
	}
}

// System is what the agent changes in the machine for a Unique request. The agent's real one is OS; tests use a
// fake, so that they never step the host's clock or rename the host.
type System interface {
	// AddEntropy mixes seed into the kernel's RNG and reseeds it.
	AddEntropy(seed []byte) error
	// SetClock steps the wall clock to t.
	SetClock(t time.Time) error
	// SetHostname sets the kernel's hostname and /etc/hostname.
	SetHostname(name string) error
	// SetMachineID writes /etc/machine-id.
	SetMachineID(id string) error
}

// NewHostKey makes a fresh ed25519 SSH host key.
func NewHostKey() (ssh.Signer, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("agent: host key: %w", err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, fmt.Errorf("agent: host key: %w", err)
	}
	return signer, nil
}

// Serve serves one channel from the host until the peer goes away, the channel fails or ctx ends, and closes
// it. The client may open with the channel preamble (see preamble.go; the host's client always does) or with its
// SSH version line, for one SSH connection over the channel; or, after the preamble, start or resume the link
// (see link.go), whose SSH connection goes on in the background across channels. It returns nil when the
// channel ended cleanly (end of file), else the reason. Commands an SSH connection started are not waited for
// when it ends: they get end of file on stdin and a broken pipe (or, on a pty, a hangup) on output, as under
// OpenSSH.
func Serve(ctx context.Context, conn io.ReadWriteCloser, cfg *ServerConfig) error {
	if cfg == nil {
		cfg = &ServerConfig{}
	}
	nc := asNetConn(conn)
	defer nc.Close()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()

	rd := nc // where the next preamble is read from
	for {
		_ = nc.SetDeadline(time.Now().Add(cfg.handshakeTimeout()))
		pc, hello, err := acceptPreamble(rd)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("agent: serve: %w", context.Cause(ctx))
			}
			return fmt.Errorf("agent: serve: %w", err)
		}
		if hello == nil {
			return serveSSH(ctx, pc, cfg)
		}
		_ = nc.SetDeadline(time.Time{})
		ch := &linkChannel{Conn: nc}
		err = cfg.links.serve(ch, pc, hello, func(l *Link) {
			if err := serveSSH(ctx, l, cfg); err != nil && ctx.Err() == nil {
				cfg.logf("link %s ended: %v", l.id, err)
			}
		})
		var nce *newChannelError
		switch {
		case ctx.Err() != nil:
			return fmt.Errorf("agent: serve: %w", context.Cause(ctx))
		case errors.As(err, &nce) && ch.released():
			// The host opened a new channel on this port (a box resumed, forked or moved) and its sync line has
			// begun: answer that line here, rather than reopen the port and wait for the host's next one. What
			// was read past the line's start is read again first.
			rest := nce.rest
			if p, ok := pc.(*prefixConn); ok {
				rest = append(rest, p.held()...)
			}
			rd = &prefixConn{Conn: nc, r: io.MultiReader(bytes.NewReader(rest), nc)}
			continue
		case cleanEnd(err):
			return nil
		}
		return fmt.Errorf("agent: serve: %w", err)
	}
}

// linkChannel is the port as one channel of a link uses it. Closing it ends the channel's use of the port, not the
// port: a pending read or write is cut short, and later writes fail; the port's next channel may begin on the
// same connection (Serve).
type linkChannel struct {
	net.Conn

	mu     sync.Mutex // held across a write, so that once closed, no write of the channel's is under way
	closed bool
	cut    bool // the deadlines that cut the pending calls short were set
}

func (c *linkChannel) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	return c.Conn.Write(p)
}

func (c *linkChannel) Close() error {
	// A deadline in the past wakes a pending read or write; the write returns, and so releases mu.
	cut := c.SetDeadline(time.Unix(1, 0)) == nil
	c.mu.Lock()
	if !c.closed {
		c.closed, c.cut = true, cut
	}
	c.mu.Unlock()
	return nil
}

// released says whether the channel let go of the port cleanly: closed, with its pending calls cut short by
// deadlines (a port without them is not used again).
func (c *linkChannel) released() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed && c.cut
}

func (cfg *ServerConfig) handshakeTimeout() time.Duration {
	if cfg.HandshakeTimeout <= 0 {
		return DefaultHandshakeTimeout
	}
	return cfg.HandshakeTimeout
}

// serveSSH runs one SSH server connection over conn until it ends or ctx ends, and closes conn.
func serveSSH(ctx context.Context, conn net.Conn, cfg *ServerConfig) error {
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	key := cfg.HostKey
	if key == nil {
		var err error
		if key, err = NewHostKey(); err != nil {
			return err
		}
	}
	sshCfg := &ssh.ServerConfig{NoClientAuth: true, ServerVersion: "SSH-2.0-boxd-agent"}
	sshCfg.AddHostKey(key)

	_ = conn.SetDeadline(time.Now().Add(cfg.handshakeTimeout()))
	sc, chans, reqs, err := ssh.NewServerConn(conn, sshCfg)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("agent: serve: %w", context.Cause(ctx))
		}
		return fmt.Errorf("agent: serve: handshake: %w", err)
	}
	_ = conn.SetDeadline(time.Time{})
	links.set(sc)
	defer links.clear(sc)

	s := &server{cfg: cfg, conn: sc, forwards: newRemoteForwards(sc, cfg.logf)}
	defer s.forwards.closeAll()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.globalRequests(reqs)
	}()
	for nch := range chans {
		switch nch.ChannelType() {
		case "session":
			go s.session(nch)
		case ProcessChannel:
			go s.process(nch)
		case "direct-tcpip":
			go directTCPIP(ctx, nch, cfg.logf)
		default:
			_ = nch.Reject(ssh.UnknownChannelType, "boxd-agent does not open "+nch.ChannelType()+" channels")
		}
	}
	err = sc.Wait()
	wg.Wait()
	if ctx.Err() != nil {
		return fmt.Errorf("agent: serve: %w", context.Cause(ctx))
	}
	if cleanEnd(err) {
		return nil
	}
	return fmt.Errorf("agent: serve: %w", err)
}

// cleanEnd says whether err ends a connection normally: end of file, or the peer's disconnect message "by
// application" (reason 11, SSH_DISCONNECT_BY_APPLICATION), which OpenSSH sends when it is done. The ssh package
// exports no type for the message, only its text.
func cleanEnd(err error) bool {
	return err == nil || errors.Is(err, io.EOF) || strings.HasPrefix(err.Error(), "ssh: disconnect, reason 11:")
}

// server is the state of one connection.
type server struct {
	cfg      *ServerConfig
	conn     ssh.Conn        // to the host, for the channels the agent opens
	forwards *remoteForwards // the listeners of ssh -R
}

func (s *server) globalRequests(reqs <-chan *ssh.Request) {
	for req := range reqs {
		switch req.Type {
		case RequestHealth:
			h, err := readHealth()
			if err != nil {
				_ = req.Reply(false, []byte(err.Error()))
				continue
			}
			payload, err := json.Marshal(h)
			if err != nil {
				_ = req.Reply(false, []byte(err.Error()))
				continue
			}
			_ = req.Reply(true, payload)
		case RequestUnique:
			if err := s.unique(req.Payload); err != nil {
				s.cfg.logf("unique: %v", err)
				_ = req.Reply(false, []byte(err.Error()))
				continue
			}
			_ = req.Reply(true, nil)
		case ProcessesRequest, SignalProcessRequest, ResizeProcessRequest, CloseStdinRequest, ForgetProcessRequest:
			// Answered in turn: SSH matches replies to global requests
			// by their order.
			payload, err := s.processRequest(req)
			if err != nil {
				_ = req.Reply(false, []byte(processFailure(err)))
				continue
			}
			_ = req.Reply(true, payload)
		case RequestTCPIPForward:
			ok, reply := s.forwards.add(req.Payload)
			_ = req.Reply(ok, reply)
		case RequestCancelTCPIPForward:
			_ = req.Reply(s.forwards.cancel(req.Payload), nil)
		default:
			// keepalive@openssh.com and the rest: "not supported" is the answer OpenSSH
			// clients expect.
			_ = req.Reply(false, nil)
		}
	}
}

// unique applies a Unique request: entropy first, so that nothing after it runs on the shared RNG state.
func (s *server) unique(payload []byte) error {
	var u Unique
	if err := json.Unmarshal(payload, &u); err != nil {
		return fmt.Errorf("agent: unique: %w: %w", errdefs.ErrInvalidArgument, err)
	}
	if err := u.Validate(); err != nil {
		return err
	}
	sys := s.cfg.System
	if sys == nil {
		return fmt.Errorf("agent: unique: this agent does not change its machine: %w", errdefs.ErrNotImplemented)
	}
	if len(u.Seed) > 0 {
		if err := sys.AddEntropy(u.Seed); err != nil {
			return fmt.Errorf("agent: unique: entropy: %w", err)
		}
	}
	if u.TimeUnixNano != 0 {
		if err := sys.SetClock(time.Unix(0, u.TimeUnixNano)); err != nil {
			return fmt.Errorf("agent: unique: clock: %w", err)
		}
	}
	if u.Hostname != "" {
		if err := sys.SetHostname(u.Hostname); err != nil {
			return fmt.Errorf("agent: unique: hostname: %w", err)
		}
	}
	if u.MachineID != "" {
		if err := sys.SetMachineID(u.MachineID); err != nil {
			return fmt.Errorf("agent: unique: machine-id: %w", err)
		}
	}
	if u.Fork != nil {
		links.noteFork(*u.Fork, s.cfg.ForkFile)
	}
	return nil
}

// asNetConn gives rwc the net.Conn that the ssh package wants. A file (the virtio-serial port) keeps its
// deadlines, which work because the port is pollable.
func asNetConn(rwc io.ReadWriteCloser) net.Conn {
	if c, ok := rwc.(net.Conn); ok {
		return c
	}
	name := "stream"
	if f, ok := rwc.(*os.File); ok {
		name = f.Name()
	}
	return &streamConn{ReadWriteCloser: rwc, addr: streamAddr(name)}
}

// streamConn is a net.Conn over a byte stream that is not a socket.
type streamConn struct {
	io.ReadWriteCloser
	addr streamAddr
}

type deadliner interface {
	SetDeadline(t time.Time) error
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
}

func (c *streamConn) LocalAddr() net.Addr  { return c.addr }
func (c *streamConn) RemoteAddr() net.Addr { return c.addr }

func (c *streamConn) SetDeadline(t time.Time) error {
	if d, ok := c.ReadWriteCloser.(deadliner); ok {
		return d.SetDeadline(t)
	}
	return nil
}

func (c *streamConn) SetReadDeadline(t time.Time) error {
	if d, ok := c.ReadWriteCloser.(deadliner); ok {
		return d.SetReadDeadline(t)
	}
	return nil
}

func (c *streamConn) SetWriteDeadline(t time.Time) error {
	if d, ok := c.ReadWriteCloser.(deadliner); ok {
		return d.SetWriteDeadline(t)
	}
	return nil
}

// streamAddr names the stream, for logs.
type streamAddr string

func (a streamAddr) Network() string { return "stream" }
func (a streamAddr) String() string  { return string(a) }

// ServeSerial serves one connection after another, as on a serial port where only one can exist at a time: next
// waits for and returns the next connection, Serve runs it, and the loop goes on until ctx ends. A connection
// that fails (a broken handshake, bytes left from an old connection) only leads to the next one; an error from
// next is logged and retried after a pause.
func ServeSerial(ctx context.Context, next func(ctx context.Context) (io.ReadWriteCloser, error), cfg *ServerConfig) error {
	if cfg == nil {
		cfg = &ServerConfig{}
	}
	const pause = 50 * time.Millisecond
	for {
		conn, err := next(ctx)
		if ctx.Err() != nil {
			if err == nil {
				conn.Close()
			}
			return ctx.Err()
		}
		if err != nil {
			cfg.logf("waiting for the host: %v", err)
			if !sleepCtx(ctx, time.Second) {
				return ctx.Err()
			}
			continue
		}
		start := time.Now()
		if err := Serve(ctx, conn, cfg); err != nil && ctx.Err() == nil {
			if !errors.Is(err, errNewChannel) {
				cfg.logf("connection ended: %v", err)
			}
			if time.Since(start) < pause && !sleepCtx(ctx, pause) {
				return ctx.Err()
			}
		}
	}
}

// sleepCtx sleeps for d or until ctx ends, and says whether ctx is still alive.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
