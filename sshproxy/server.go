package sshproxy

import (
	"context"
	"crypto/ed25519"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// Backend is what the proxy needs from the box manager.
type Backend interface {
	// AuthorizedKeys returns the public keys allowed into box name. An
	// unknown box returns an error (errdefs.ErrNotFound); the proxy refuses
	// it exactly as it refuses a wrong key.
	AuthorizedKeys(ctx context.Context, box string) ([]ssh.PublicKey, error)
	// Connect returns an SSH client connected to the box's agent, resuming a
	// hibernated box first (this may take seconds; the person waits). The
	// client stays the backend's: it may be shared by every connection to
	// the box, and the proxy never closes it, only the channels it opened.
	// ctx ends when the person disconnects or the proxy closes.
	Connect(ctx context.Context, box string) (*ssh.Client, error)
}

// Server is the SSH front door. Set its fields, then call Serve.
type Server struct {
	// HostKey is the proxy's identity (see LoadOrCreateHostKey). Required.
	HostKey ssh.Signer
	// Backend reaches the boxes. Required.
	Backend Backend
	// Commands, when set, runs boxd's commands for user CommandUser
	// (ssh boxd@host COMMAND) with the keys it names.
	Commands Commands
	// Logger receives connects, disconnects and refusals; nil logs nothing.
	Logger *slog.Logger
	// HandshakeTimeout bounds the SSH handshake and authentication; zero
	// means 30 seconds. It does not bound Backend.Connect.
	HandshakeTimeout time.Duration
	// Throttle slows down the refusals for a source address that keeps
	// failing to log in; nil means a Throttle with its defaults.
	Throttle *Throttle
	// Observe, when set, is told what becomes of each connection: once
	// Refused, Failed or Connected; after Connected, Unreachable if its box
	// could not be reached, and Disconnected when it ends. It must be
	// quick.
	Observe func(Outcome)

	initOnce sync.Once
	ctx      context.Context // ends at Close
	cancel   context.CancelFunc
	decoy    ssh.PublicKey // compared against when a box has no keys

	// mu protects the fields below.
	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	links     map[*ssh.Client]*boxLink
	handlers  sync.WaitGroup // one per accepted connection; Add under mu while !closed
}

// Outcome is what became of an SSH connection (see Server.Observe).
type Outcome string

// Outcomes of a connection.
const (
	Refused      Outcome = "refused"      // no key it offered opens the box it named (or no such box)
	Failed       Outcome = "failed"       // the handshake failed otherwise (a timeout, a protocol error)
	Connected    Outcome = "connected"    // authenticated for its box
	Unreachable  Outcome = "unreachable"  // authenticated, but its box could not be resumed or booted
	Disconnected Outcome = "disconnected" // a Connected connection ended
)

func (s *Server) observe(o Outcome) {
	if s.Observe != nil {
		s.Observe(o)
	}
}

// Permissions.Extensions keys set at authentication and read after it.
const (
	extBox = "boxd-box"
	extKey = "boxd-key-fingerprint"
)

const defaultHandshakeTimeout = 30 * time.Second

// errRefused is the one refusal for every failed key: unknown box, wrong
// key, backend failure. The client never sees it (SSH only says which
// methods remain), but one value keeps the paths identical.
var errRefused = errors.New("ssh: public key refused")

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.listeners = map[net.Listener]struct{}{}
		s.conns = map[net.Conn]struct{}{}
		s.links = map[*ssh.Client]*boxLink{}
		if s.Throttle == nil {
			s.Throttle = &Throttle{}
		}
		pub, _, err := ed25519.GenerateKey(nil)
		if err == nil {
			s.decoy, err = ssh.NewPublicKey(pub)
		}
		if err != nil {
			panic(fmt.Sprintf("sshproxy: make decoy key: %v", err))
		}
	})
}

func (s *Server) logger() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// Serve accepts connections on l until Close, and returns ErrServerClosed
// then; it closes l when it returns. It may be called for several
// listeners; Close closes them all.
func (s *Server) Serve(l net.Listener) error {
	if s.HostKey == nil || s.Backend == nil {
		return errcat.With(errors.New("ssh proxy needs a host key and a backend"), errdefs.ErrInvalidArgument)
	}
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		_ = l.Close()
	}()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if !retryable(err) {
				return fmt.Errorf("accept ssh connection: %w", err)
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logger().Warn("ssh accept failed; retrying", "err", err, "in", backoff)
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = nc.Close()
			return ErrServerClosed
		}
		s.conns[nc] = struct{}{}
		s.handlers.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.handlers.Done()
			defer func() {
				s.mu.Lock()
				delete(s.conns, nc)
				s.mu.Unlock()
			}()
			s.serveConn(nc)
		}()
	}
}

// retryable reports whether Accept may succeed if tried again: too many
// open files, a connection aborted before it was accepted, a timeout.
func retryable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops every Serve, ends every connection (the sessions they relay
// end with them: the proxy closes its channels on the boxes) and waits for
// their handlers to return.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.cancel()
	var errs []error
	for l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for nc := range s.conns {
		_ = nc.Close()
	}
	s.mu.Unlock()
	s.handlers.Wait()
	return errors.Join(errs...)
}

// link returns the boxLink of client, made at its first connection: one
// goroutine watches each client however many connections share it, one
// routes each type of channel the box opens back, and they end with the
// client.
func (s *Server) link(client *ssh.Client) *boxLink {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l, ok := s.links[client]; ok {
		return l
	}
	l := &boxLink{done: make(chan struct{}), routes: map[string]*proxyConn{}}
	s.links[client] = l
	for _, typ := range []string{chanForwardedTCPIP, chanAuthAgent} {
		chans := client.HandleChannelOpen(typ)
		if chans == nil {
			s.logger().Warn("ssh: the box's client already handles a channel type; not relaying it", "type", typ)
			continue
		}
		go l.route(typ, chans)
	}
	go func() {
		_ = client.Wait()
		s.mu.Lock()
		delete(s.links, client)
		s.mu.Unlock()
		close(l.done)
	}()
	return l
}

// authorize is the PublicKeyCallback. It decides from this key and this
// user name only, and what it decides travels in the returned Permissions:
// after the handshake the proxy reads the permissions of the key that
// actually signed, never a key that was merely offered.
func (s *Server) authorize(ctx context.Context, meta ssh.ConnMetadata, key ssh.PublicKey, att *loginAttempt) (*ssh.Permissions, error) {
	box := meta.User()
	fp := ssh.FingerprintSHA256(key)
	var keys []ssh.PublicKey
	var err error
	if s.commands(box) {
		keys, err = s.Commands.CommandKeys(ctx)
	} else {
		keys, err = s.Backend.AuthorizedKeys(ctx, box)
	}
	if err != nil {
		keys = nil
	}
	if !s.keyIn(key, keys) {
		log := s.logger().With("box", box, "remote", meta.RemoteAddr().String(), "key", fp)
		var reason string
		switch {
		case err == nil:
			reason = "not authorized for the box"
		case errdefs.IsNotFound(err):
			reason = "no such box"
		default:
			reason = "cannot read the box's keys"
			log.Warn("ssh key refused: cannot read the box's keys", "err", err)
		}
		// Every refusal waits alike, whatever its reason, so the wait
		// tells the person nothing more than the refusal does.
		d := s.Throttle.Delay(meta.RemoteAddr())
		if dl, ok := ctx.Deadline(); ok {
			d = min(d, max(time.Until(dl), 0)) // the connection ends there
		}
		log.Debug("ssh key refused: "+reason, "delay", d)
		att.refused(fp, reason)
		if d > 0 {
			att.delayed(d)
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
		return nil, errRefused
	}
	return &ssh.Permissions{Extensions: map[string]string{extBox: box, extKey: fp}}, nil
}

// commands reports whether user runs boxd's commands rather than reaching
// a box.
func (s *Server) commands(user string) bool { return s.Commands != nil && user == CommandUser }

// keyIn reports whether key is one of keys. It compares against every key,
// in constant time each, and against a decoy when there are none, so an
// unknown box costs about what a wrong key does.
func (s *Server) keyIn(key ssh.PublicKey, keys []ssh.PublicKey) bool {
	want := key.Marshal()
	candidates := keys
	if len(candidates) == 0 {
		candidates = []ssh.PublicKey{s.decoy}
	}
	found := 0
	for _, k := range candidates {
		found |= subtle.ConstantTimeCompare(k.Marshal(), want)
	}
	return found == 1 && len(keys) > 0
}

// loginAttempt is what one connection tried before it was let in or
// refused, for the log of a refusal.
type loginAttempt struct {
	user    string
	keys    []string // fingerprints of the keys refused, at most maxLoggedKeys
	reasons []string // why, for each
	delay   time.Duration
}

// maxLoggedKeys bounds the refused keys a refusal's log names.
const maxLoggedKeys = 8

func (a *loginAttempt) refused(fp, reason string) {
	if len(a.keys) < maxLoggedKeys {
		a.keys = append(a.keys, fp)
		a.reasons = append(a.reasons, reason)
	}
}

func (a *loginAttempt) delayed(d time.Duration) { a.delay += d }

// config is the server config of one connection; att learns what it tries.
func (s *Server) config(ctx context.Context, att *loginAttempt) *ssh.ServerConfig {
	cfg := &ssh.ServerConfig{
		ServerVersion: "SSH-2.0-boxd",
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			return s.authorize(ctx, meta, key, att)
		},
		AuthLogCallback: func(meta ssh.ConnMetadata, _ string, _ error) {
			att.user = meta.User()
		},
	}
	cfg.AddHostKey(s.HostKey)
	return cfg
}

// serveConn runs one person's connection: handshake, Backend.Connect, and
// the relay of every channel they open, until either side ends it.
func (s *Server) serveConn(nc net.Conn) {
	defer nc.Close()
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	remote := nc.RemoteAddr().String()
	log := s.logger().With("remote", remote)

	timeout := s.HandshakeTimeout
	if timeout <= 0 {
		timeout = defaultHandshakeTimeout
	}
	deadline := time.Now().Add(timeout)
	_ = nc.SetDeadline(deadline)
	// Reading keys and waiting out refusals end with the handshake too.
	hctx, hcancel := context.WithDeadline(ctx, deadline)
	var att loginAttempt
	sconn, chans, reqs, err := ssh.NewServerConn(nc, s.config(hctx, &att))
	hcancel()
	if err != nil {
		// A connection that ran out of time after keys were refused was
		// refused too: the throttle's own waits may take it there.
		if ae := (*ssh.ServerAuthError)(nil); errors.As(err, &ae) || len(att.keys) > 0 {
			failures := s.Throttle.Fail(nc.RemoteAddr())
			log.Warn("ssh login refused", "box", att.user, "keys", att.keys, "reasons", att.reasons,
				"delay", att.delay.Round(time.Millisecond), "recent_failures", math.Round(failures*10)/10)
			s.observe(Refused)
		} else {
			log.Info("ssh handshake failed", "err", err)
			s.observe(Failed)
		}
		return
	}
	_ = nc.SetDeadline(time.Time{})
	defer sconn.Close()

	var box, fp string
	if p := sconn.Permissions; p != nil {
		box, fp = p.Extensions[extBox], p.Extensions[extKey]
	}
	if box == "" || box != sconn.User() {
		// Cannot happen with authorize as the only way in; refuse anyway.
		log.Error("ssh connection authenticated without a box; closing", "user", sconn.User())
		return
	}
	log = log.With("box", box, "key", fp)
	start := time.Now()
	log.Info("ssh connect")
	s.observe(Connected)
	defer s.observe(Disconnected)

	// End ctx, cancelling Connect, when the person leaves.
	go func() {
		_ = sconn.Wait()
		cancel()
	}()

	if s.commands(box) {
		// Answer the person's global requests (keepalives): nothing to
		// forward without a box.
		go ssh.DiscardRequests(reqs)
		s.serveCommands(ctx, sconn, chans, fp, log)
		log.Info("ssh disconnect", "duration", time.Since(start).Round(time.Millisecond))
		return
	}

	// Keepalives are answered at once, also while the box resumes, unless a
	// forward request waits before them; forward requests and channels wait
	// for the box, in order.
	items := make(chan intakeItem, 64)
	var queued atomic.Int64 // requests in items, or taken from it and not yet answered
	go intake(ctx.Done(), reqs, chans, items, &queued)

	stopBeat := heartbeat(sconn, heartbeatEvery)
	client, err := s.Backend.Connect(ctx, box)
	stopBeat()
	if err == nil && client == nil {
		err = errors.New("the box manager returned no connection")
	}
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("ssh connect to box failed", "err", err)
			s.observe(Unreachable)
			refuseItems(items, &queued, fmt.Sprintf("boxd: cannot reach box %s: %v", box, err), timeout)
		}
		log.Info("ssh disconnect", "duration", time.Since(start).Round(time.Millisecond))
		return
	}

	link := s.link(client)
	c := &proxyConn{
		name:     box,
		box:      client,
		boxDone:  link.done,
		person:   sconn,
		tag:      newTag(),
		log:      log,
		sessions: map[chan struct{}]struct{}{},
		forwards: map[forwardKey]struct{}{},
	}
	link.add(c)
	defer link.remove(c)
	defer func() { go c.dropForwards() }()
	go func() {
		select {
		case <-c.boxDone:
			log.Warn("ssh connection to box lost")
			c.drainSessions(5 * time.Second)
			_ = sconn.Close()
		case <-ctx.Done():
		}
	}()
	var channels sync.WaitGroup
	for it := range items {
		if it.req != nil {
			c.answer(it.req, &queued)
			continue
		}
		channels.Go(func() { c.handleChannel(it.nch) })
	}
	channels.Wait()
	log.Info("ssh disconnect", "duration", time.Since(start).Round(time.Millisecond))
}
