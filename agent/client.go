package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// Handshake timeouts of Dial's attempts: the first attempt gets AttemptTimeout, each later one twice the one
// before, up to MaxAttemptTimeout. A guest under TCG is slow (a handshake may take hundreds of milliseconds, more
// on a loaded host), and an attempt cut short only costs a retry.
const (
	AttemptTimeout    = 5 * time.Second
	MaxAttemptTimeout = 30 * time.Second
)

// Dial's pause between attempts grows from dialRetryMin to dialRetryMax.
const (
	dialRetryMin = 20 * time.Millisecond
	dialRetryMax = 500 * time.Millisecond
)

// agentCiphers are the ciphers the host offers the agent, most wanted first. The guest does the costly end: a
// box's CPU model (QEMU's default) has no AES instructions, and there Go's ChaCha20-Poly1305 encrypts about four
// times as fast as its AES-GCM (about 58 against 13 MB/s in a box under TCG), which bounds how fast a box takes
// an upload. Every agent supports it; the rest are x/crypto/ssh's defaults, in their order.
var agentCiphers = []string{ssh.CipherChaCha20Poly1305, ssh.CipherAES128GCM, ssh.CipherAES256GCM,
	ssh.CipherAES128CTR, ssh.CipherAES192CTR, ssh.CipherAES256CTR}

// Client is the host's connection to one box's agent: an SSH connection over the link (see link.go), or, to an
// agent without the link, straight over the channel.
type Client struct {
	ssh *ssh.Client
	// link is the host's end of the link; nil on a channel without one.
	link *Link
	// redial is where the link's next channel comes from (see linkclient.go).
	redial *redialer
	// detachMu protects detach, closed by DetachProcesses.
	detachMu sync.Mutex
	detach   chan struct{}
}

// Dial connects to the agent behind a unix socket (QEMU's chardev for the agent's port), retrying the connection
// and the SSH handshake until one succeeds or ctx ends. Each attempt has a bounded handshake timeout (see
// AttemptTimeout): a guest that is still booting, or an attempt spoilt by bytes left over from an earlier
// connection, leads to the next attempt, and the agent reopens its port when the host side goes away.
//
// The connection runs over a new link, which replaces any the agent had (a fork's child's, inherited from its
// parent; one of a boxd before this one). When the link's channel breaks, the client dials socketPath again (or
// where Move says) and resumes it. An agent without the link gets a plain connection, which ends with its channel.
//
// The agent's host key is not checked: the socket is reachable only by root on the host, so no one can stand
// between client and agent, and the agent makes a fresh key at every boot, which no one could pin anyway.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	return dial(ctx, socketPath, AttemptTimeout)
}

// DialBooting is Dial for a machine that has just started booting: its first attempt waits for the guest for as
// long as ctx allows. A fresh machine holds no bytes of an earlier connection that could spoil that attempt,
// and its guest takes seconds to open the agent's port (about 4-5 s from QEMU's start under TCG here), so a
// first attempt cut at AttemptTimeout only cost a reconnection.
func DialBooting(ctx context.Context, socketPath string) (*Client, error) {
	return dial(ctx, socketPath, 0)
}

// dial is Dial with first as the first attempt's timeout; 0 leaves the first attempt to ctx.
func dial(ctx context.Context, socketPath string, first time.Duration) (*Client, error) {
	var lastErr error
	pause, timeout := dialRetryMin, first
	plain := false
	for {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "unix", socketPath)
		if err == nil {
			var actx context.Context
			var cancel context.CancelFunc
			if timeout > 0 {
				actx, cancel = context.WithTimeout(ctx, timeout)
			} else {
				actx, cancel = context.WithCancel(ctx)
			}
			var c *Client
			c, err = newClient(actx, conn, plain, socketPath)
			cancel()
			if err == nil {
				return c, nil
			}
			if errors.Is(err, errNoLink) && !plain {
				plain = true
				continue
			}
			// Twice the last, and AttemptTimeout after a first attempt left to ctx.
			timeout = min(2*max(timeout, AttemptTimeout/2), MaxAttemptTimeout)
		}
		if ctx.Err() == nil || lastErr == nil {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return nil, errcat.With(fmt.Errorf("agent: no agent answered on %s: %w (last attempt: %w)",
				socketPath, ctx.Err(), lastErr), errdefs.ErrUnavailable)
		case <-time.After(pause):
		}
		pause = min(2*pause, dialRetryMax)
	}
}

// NewClient makes one SSH handshake with the agent over conn, bounded by ctx: first the channel preamble, which
// skips bytes left over from earlier connections (see preamble.go), then a new link and SSH over it. Unless Move
// says where to dial next, the link, and the connection, end with conn. On failure conn is closed; an agent
// without the link is an error that wraps errdefs.ErrNotImplemented.
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	return newClient(ctx, conn, false, "")
}

// newClient is NewClient; plain makes an SSH connection straight over conn, without the link, and socketPath is
// where the link's next channel is dialled.
func newClient(ctx context.Context, conn net.Conn, plain bool, socketPath string) (*Client, error) {
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			conn.Close()
			return nil, fmt.Errorf("agent: handshake: %w", err)
		}
	}
	// sshConn is what SSH runs over: conn, or the link over it.
	var sshMu sync.Mutex
	sshConn := conn
	stop := context.AfterFunc(ctx, func() {
		// Wakes the handshake at once; the deadline covers the ctx that ends by its deadline.
		_ = conn.SetDeadline(time.Unix(1, 0))
		sshMu.Lock()
		defer sshMu.Unlock()
		_ = sshConn.SetDeadline(time.Unix(1, 0))
	})
	cfg := &ssh.ClientConfig{
		User: "root",
		// The agent accepts "none" authentication, which the client always tries first.
		Auth: nil,
		// See Dial: the channel is root's alone on the host and the agent's key is made fresh at every boot.
		HostKeyCallback: ssh.InsecureIgnoreHostKey(),
		Config:          ssh.Config{Ciphers: agentCiphers},
	}
	var link *Link
	var red *redialer
	var sc ssh.Conn
	var chans <-chan ssh.NewChannel
	var reqs <-chan *ssh.Request
	pc, err := syncClient(conn)
	if err == nil && !plain {
		link, red, err = startLink(pc, socketPath)
		if err == nil {
			if deadline, ok := ctx.Deadline(); ok {
				_ = link.SetDeadline(deadline)
			}
			sshMu.Lock()
			sshConn = link
			sshMu.Unlock()
		}
	} else if err == nil {
		sshMu.Lock()
		sshConn = pc
		sshMu.Unlock()
	}
	if err == nil {
		sc, chans, reqs, err = ssh.NewClientConn(sshConn, "boxd-agent", cfg)
	}
	fail := func(err error) (*Client, error) {
		if sc != nil {
			sc.Close()
		}
		if link != nil {
			link.fail(err)
		}
		conn.Close()
		return nil, errcat.With(fmt.Errorf("agent: handshake: %w", err), errdefs.ErrUnavailable)
	}
	if !stop() || ctx.Err() != nil {
		return fail(context.Cause(ctx))
	}
	if err != nil {
		if errors.Is(err, errNoLink) {
			conn.Close()
			return nil, err
		}
		return fail(err)
	}
	// The handshake's deadline goes from the link too, and from conn, which carries the link's first channel.
	if err := errors.Join(sshConn.SetDeadline(time.Time{}), conn.SetDeadline(time.Time{})); err != nil {
		return fail(err)
	}
	c := &Client{ssh: ssh.NewClient(sc, chans, reqs), link: link, redial: red}
	if link != nil {
		go func() {
			_ = c.ssh.Wait()
			link.Close()
		}()
	}
	return c, nil
}

// SSH returns the SSH connection to the agent, for what Client does not wrap: sftp (github.com/pkg/sftp's
// NewClient), port forwarding (Dial), or relaying another client's channels.
func (c *Client) SSH() *ssh.Client { return c.ssh }

// Close ends the connection. Commands still running in the guest get end of file on stdin and a broken pipe on
// output; those on a pty get a hangup.
func (c *Client) Close() error {
	err := c.ssh.Close()
	if c.link != nil {
		_ = c.link.Close()
		c.redial.interrupt()
	}
	return err
}

// Wait returns when the connection has ended, with the reason.
func (c *Client) Wait() error { return c.ssh.Wait() }

// WindowSize is a terminal's size in character cells.
type WindowSize struct {
	Rows, Cols int
}

// Command is something to run in the guest, as root, in /root, with HOME and PATH set.
type Command struct {
	// Args is the command and its arguments. They are quoted for the guest's /bin/sh, which runs them, so no
	// argument is split or expanded.
	Args []string
	// Shell is a line for the guest's /bin/sh -c, used when Args is empty. With both empty the guest runs a login
	// shell (bash if it has it, else sh), reading commands from Stdin.
	Shell string
	// Env adds to (or replaces in) the command's environment.
	Env map[string]string
	// Stdin, Stdout and Stderr are the command's standard streams; nil means empty input and discarded output.
	// The command sees end of file on stdin when Stdin does.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// TTY runs the command on a pseudo-terminal of Rows x Cols (24 x 80 when zero) with TERM from Env (else
	// xterm). Its stdout and stderr both arrive on Stdout.
	TTY        bool
	Rows, Cols int
	// Resize, when not nil, carries window size changes to the pty while the command runs.
	Resize <-chan WindowSize
	// Signals, when not nil, carries signals for the command's process group while it runs.
	Signals <-chan ssh.Signal
}

// line is the shell line that runs cmd, and whether it is one at all (else the guest runs a login shell).
func (cmd Command) line() (string, bool) {
	if len(cmd.Args) > 0 {
		quoted := make([]string, len(cmd.Args))
		for i, a := range cmd.Args {
			quoted[i] = ShellQuote(a)
		}
		return strings.Join(quoted, " "), true
	}
	return cmd.Shell, cmd.Shell != ""
}

// ShellQuote quotes s for a POSIX shell: unchanged if it needs no quoting, else in single quotes.
func ShellQuote(s string) string {
	if s == "" {
		return "''"
	}
	safe := true
	for _, r := range s {
		if !isAlnum(r) && !strings.ContainsRune("@%+=:,./_-", r) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Run runs cmd in the guest and returns its exit code, as a local shell would report it: 127 for a command not
// found, 128+n for a death by signal n. err is only for failures to run it at all: a broken connection, a
// refused session, or ctx ending, which kills the command's process group.
func (c *Client) Run(ctx context.Context, cmd Command) (exitCode int, err error) {
	sess, err := c.newSession(ctx)
	if err != nil {
		return -1, fmt.Errorf("agent: run: new session: %w", err)
	}
	defer sess.Close()
	// Until the command starts, ctx ending closes the session, which ends a request the guest leaves unanswered.
	setup := context.AfterFunc(ctx, func() { sess.Close() })
	defer setup()
	failed := func(what string, err error) (int, error) {
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		return -1, fmt.Errorf("agent: run: %s: %w", what, err)
	}

	keys := make([]string, 0, len(cmd.Env))
	for k := range cmd.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := sess.Setenv(k, cmd.Env[k]); err != nil {
			return failed("env "+k, err)
		}
	}
	if cmd.TTY {
		term := cmd.Env["TERM"]
		if term == "" {
			term = "xterm"
		}
		rows, cols := cmd.Rows, cmd.Cols
		if rows <= 0 || cols <= 0 {
			rows, cols = 24, 80
		}
		if err := sess.RequestPty(term, rows, cols, ssh.TerminalModes{}); err != nil {
			return failed("pty", err)
		}
	}
	sess.Stdin, sess.Stdout, sess.Stderr = cmd.Stdin, cmd.Stdout, cmd.Stderr

	if line, ok := cmd.line(); ok {
		err = sess.Start(line)
	} else {
		err = sess.Shell()
	}
	if err != nil {
		return failed("start", err)
	}
	if !setup() {
		return failed("start", context.Cause(ctx))
	}

	done := make(chan struct{})
	defer close(done)
	if cmd.Resize != nil {
		go func() {
			for {
				select {
				case <-done:
					return
				case ws, ok := <-cmd.Resize:
					if !ok {
						return
					}
					_ = sess.WindowChange(ws.Rows, ws.Cols)
				}
			}
		}()
	}
	if cmd.Signals != nil {
		go func() {
			for {
				select {
				case <-done:
					return
				case sig, ok := <-cmd.Signals:
					if !ok {
						return
					}
					_ = sess.Signal(sig)
				}
			}
		}()
	}
	stop := context.AfterFunc(ctx, func() {
		_ = sess.Signal(ssh.SIGKILL)
		sess.Close()
	})
	defer stop()

	err = sess.Wait()
	if ctx.Err() != nil {
		return -1, fmt.Errorf("agent: run: %w", context.Cause(ctx))
	}
	if err == nil {
		return 0, nil
	}
	var exit *ssh.ExitError
	if errors.As(err, &exit) {
		if sig := exit.Signal(); sig != "" {
			return 128 + signalNumbers[sig], nil
		}
		return exit.ExitStatus(), nil
	}
	return -1, fmt.Errorf("agent: run: %w", err)
}

// newSession opens a session channel, or returns ctx's error if ctx ends first (a guest that does not answer).
func (c *Client) newSession(ctx context.Context) (*ssh.Session, error) {
	return beforeDone(ctx, c.ssh.NewSession, func(s *ssh.Session) { s.Close() })
}

// beforeDone returns what open returns, or the cause of ctx's end when that comes first: open waits on the guest,
// which may never answer. What open gets after that is given to drop.
func beforeDone[T any](ctx context.Context, open func() (T, error), drop func(T)) (T, error) {
	type opened struct {
		v   T
		err error
	}
	res := make(chan opened, 1)
	go func() {
		v, err := open()
		res <- opened{v, err}
	}()
	select {
	case o := <-res:
		return o.v, o.err
	case <-ctx.Done():
		go func() {
			if o := <-res; o.err == nil {
				drop(o.v)
			}
		}()
		var zero T
		return zero, context.Cause(ctx)
	}
}

// ExitError is Output's error for a command that ran and did not exit 0.
type ExitError struct {
	Args   []string // the command
	Code   int      // its exit code, as Run reports it
	Stderr []byte   // what it wrote on stderr
}

func (e *ExitError) Error() string {
	msg := fmt.Sprintf("agent: %s exited with status %d", strings.Join(e.Args, " "), e.Code)
	if s := strings.TrimSpace(string(e.Stderr)); s != "" {
		msg += ": " + s
	}
	return msg
}

// Output runs args in the guest and returns its stdout. A non-zero exit is an *ExitError with the exit code and
// stderr.
func (c *Client) Output(ctx context.Context, args ...string) (stdout []byte, err error) {
	var out, errOut bytes.Buffer
	code, err := c.Run(ctx, Command{Args: args, Stdout: &out, Stderr: &errOut})
	if err != nil {
		return nil, err
	}
	if code != 0 {
		return out.Bytes(), &ExitError{Args: args, Code: code, Stderr: errOut.Bytes()}
	}
	return out.Bytes(), nil
}

// request sends a global request and returns the reply, or ctx's error if ctx ends first.
func (c *Client) request(ctx context.Context, name string, payload []byte) (bool, []byte, error) {
	type reply struct {
		ok      bool
		payload []byte
		err     error
	}
	ch := make(chan reply, 1)
	go func() {
		ok, p, err := c.ssh.SendRequest(name, true, payload)
		ch <- reply{ok, p, err}
	}()
	select {
	case r := <-ch:
		return r.ok, r.payload, r.err
	case <-ctx.Done():
		return false, nil, context.Cause(ctx)
	}
}

// Health asks the guest how it is.
func (c *Client) Health(ctx context.Context) (Health, error) {
	ok, payload, err := c.request(ctx, RequestHealth, nil)
	if err != nil {
		return Health{}, fmt.Errorf("agent: health: %w", err)
	}
	if !ok {
		return Health{}, fmt.Errorf("agent: health: refused: %s", payload)
	}
	var h Health
	if err := json.Unmarshal(payload, &h); err != nil {
		return Health{}, fmt.Errorf("agent: health: %w", err)
	}
	return h, nil
}

// Unique makes the guest its own after a fork or a restore (see Unique and NewUnique). An invalid u is refused
// here with errdefs.ErrInvalidArgument; one the guest fails to apply is an error with the guest's reason.
func (c *Client) Unique(ctx context.Context, u Unique) error {
	if err := u.Validate(); err != nil {
		return err
	}
	payload, err := json.Marshal(u)
	if err != nil {
		return fmt.Errorf("agent: unique: %w", err)
	}
	ok, reply, err := c.request(ctx, RequestUnique, payload)
	if err != nil {
		return fmt.Errorf("agent: unique: %w", err)
	}
	if !ok {
		return fmt.Errorf("agent: unique: the guest refused: %s", reply)
	}
	return nil
}
