package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
	"golang.org/x/sys/unix"
)

// DefaultPath is the PATH of every command the agent runs.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// outputGrace is how long after a command exits its output may stay open with nothing in it before the agent
// stops reading: a background process that inherited stdout would otherwise hold the session open forever.
// Output the command wrote before it exited is never cut off.
const outputGrace = 200 * time.Millisecond

// Payloads of the session requests (RFC 4254 section 6).
type (
	ptyRequest struct {
		Term          string
		Columns, Rows uint32
		Width, Height uint32
		Modes         string
	}
	windowChange struct {
		Columns, Rows uint32
		Width, Height uint32
	}
	envRequest    struct{ Name, Value string }
	execRequest   struct{ Command string }
	signalRequest struct{ Signal string }
	subsystemReq  struct{ Name string }
	exitStatusMsg struct{ Status uint32 }
	exitSignalMsg struct {
		Signal     string
		CoreDumped bool
		Error      string
		Lang       string
	}
)

// session is one "session" channel.
type session struct {
	srv *server
	ch  ssh.Channel
	env map[string]string

	// master and tty are the pty after a pty-req; tty is the child's end, closed once the child has it.
	master, tty *os.File
	term        string

	// started and authAgent are set by the request loop alone.
	started   bool
	authAgent *authAgentSocket // the session's agent socket after an auth-agent-req@openssh.com

	// mu protects the fields below, shared with the goroutine that waits for the command.
	mu     sync.Mutex
	proc   *os.Process
	exited bool
}

func (s *server) session(nch ssh.NewChannel) {
	ch, reqs, err := nch.Accept()
	if err != nil {
		return
	}
	ss := &session{srv: s, ch: ch, env: map[string]string{}}
	for req := range reqs {
		ok, then := ss.handle(req)
		_ = req.Reply(ok, nil)
		if then != nil {
			// After the reply: a command that ends at once must not close the channel before its start is
			// acknowledged.
			then()
		}
	}
	// The channel is closed. A command that runs on gets end of file on stdin and a broken pipe on output, and
	// loses the session's agent socket.
	if !ss.started {
		ss.closePTY()
	}
	if ss.authAgent != nil {
		ss.authAgent.Close()
	}
}

// handle carries out one channel request and says whether it succeeded; then, when not nil, is to run once the
// reply is sent.
func (ss *session) handle(req *ssh.Request) (ok bool, then func()) {
	switch req.Type {
	case "env":
		var r envRequest
		if ssh.Unmarshal(req.Payload, &r) != nil || r.Name == "" {
			return false, nil
		}
		ss.env[r.Name] = r.Value
		return true, nil
	case "pty-req":
		var r ptyRequest
		if ss.started || ss.master != nil || ssh.Unmarshal(req.Payload, &r) != nil {
			return false, nil
		}
		if err := ss.openPTY(r); err != nil {
			ss.srv.cfg.logf("pty: %v", err)
			return false, nil
		}
		return true, nil
	case "window-change":
		var r windowChange
		if ss.master == nil || ssh.Unmarshal(req.Payload, &r) != nil {
			return false, nil
		}
		return setWinsize(ss.master, r.Rows, r.Columns) == nil, nil
	case "exec":
		var r execRequest
		if ss.started || ssh.Unmarshal(req.Payload, &r) != nil {
			return false, nil
		}
		return ss.run([]string{"/bin/sh", "-c", r.Command})
	case "shell":
		if ss.started {
			return false, nil
		}
		return ss.run([]string{loginShell(), "-l"})
	case "subsystem":
		var r subsystemReq
		if ss.started || ssh.Unmarshal(req.Payload, &r) != nil || (r.Name != "sftp" && r.Name != ExactSFTP) {
			return false, nil
		}
		ss.started = true
		return true, func() { go ss.sftp(r.Name == ExactSFTP) }
	case "signal":
		var r signalRequest
		if ssh.Unmarshal(req.Payload, &r) != nil {
			return false, nil
		}
		n, ok := signalNumbers[r.Signal]
		return ok && ss.signal(syscall.Signal(n)), nil
	case RequestAuthAgent:
		if ss.started || ss.authAgent != nil {
			return false, nil
		}
		a, err := listenAuthAgent(ss.srv.conn, req.Payload, ss.srv.cfg.logf)
		if err != nil {
			ss.srv.cfg.logf("%v", err)
			return false, nil
		}
		ss.authAgent = a
		return true, nil
	default:
		// x11-req and the like.
		return false, nil
	}
}

func (ss *session) openPTY(r ptyRequest) error {
	m, t, err := pty.Open()
	if err != nil {
		return fmt.Errorf("agent: open pty: %w", err)
	}
	master, err := pollable(m)
	if err != nil {
		t.Close()
		return err
	}
	rows, cols := r.Rows, r.Columns
	if rows == 0 || cols == 0 {
		rows, cols = 24, 80
	}
	if err := setWinsize(master, rows, cols); err != nil {
		master.Close()
		t.Close()
		return err
	}
	ss.master, ss.tty, ss.term = master, t, r.Term
	return nil
}

func (ss *session) closePTY() {
	if ss.master != nil {
		ss.master.Close()
	}
	if ss.tty != nil {
		ss.tty.Close()
	}
}

// pollable returns f's descriptor as a non-blocking file that Go's poller serves, so that Close wakes a pending
// Read; f is closed. (pty.Open's master has been made blocking by its ioctls.)
func pollable(f *os.File) (*os.File, error) {
	defer f.Close()
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("agent: dup %s: %w", f.Name(), err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("agent: %s: %w", f.Name(), err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// loginShell is bash if the guest has it, else sh.
func loginShell() string {
	if _, err := os.Stat("/bin/bash"); err == nil {
		return "/bin/bash"
	}
	return "/bin/sh"
}

// workDir is root's home, or / without one (or one the agent cannot enter).
func workDir() string {
	// X_OK: a folder the agent cannot enter (an agent run as another user,
	// as the box manager's tests do) would fail every command.
	if fi, err := os.Stat("/root"); err == nil && fi.IsDir() && syscall.Access("/root", 1) == nil {
		return "/root"
	}
	return "/"
}

// environ is a command's environment: root's basics, TERM on a pty, what the client asked for, then
// SSH_AUTH_SOCK when the session forwards an agent.
func (ss *session) environ(shell string) []string {
	env := map[string]string{
		"HOME": "/root", "PATH": DefaultPath, "USER": "root", "LOGNAME": "root", "SHELL": shell,
	}
	if ss.master != nil {
		env["TERM"] = ss.term
		if env["TERM"] == "" {
			env["TERM"] = "xterm"
		}
	}
	for k, v := range ss.env {
		env[k] = v
	}
	if ss.authAgent != nil {
		env["SSH_AUTH_SOCK"] = ss.authAgent.path
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// output is one stream the agent copies from the command to the client.
type output struct {
	f    *os.File
	done chan struct{}
}

// run starts argv as the session's command and says whether it started; then starts the goroutines that see it
// through.
func (ss *session) run(argv []string) (ok bool, then func()) {
	ss.started = true
	attr := &os.ProcAttr{
		Dir: workDir(),
		Env: ss.environ(loginShell()),
		Sys: &syscall.SysProcAttr{Setsid: true},
	}
	var outs []output
	var closeAfterStart []*os.File
	if ss.master != nil {
		attr.Files = []*os.File{ss.tty, ss.tty, ss.tty}
		attr.Sys.Setctty, attr.Sys.Ctty = true, 0
		closeAfterStart = append(closeAfterStart, ss.tty)
		outs = append(outs, output{ss.master, make(chan struct{})})
	} else {
		var pipes [3][2]*os.File // stdin, stdout, stderr: read end, write end
		for i := range pipes {
			r, w, err := os.Pipe()
			if err != nil {
				for _, p := range pipes[:i] {
					p[0].Close()
					p[1].Close()
				}
				ss.srv.cfg.logf("exec %q: %v", argv, err)
				return false, nil
			}
			pipes[i] = [2]*os.File{r, w}
		}
		attr.Files = []*os.File{pipes[0][0], pipes[1][1], pipes[2][1]}
		closeAfterStart = append(closeAfterStart, pipes[0][0], pipes[1][1], pipes[2][1])
		outs = append(outs, output{pipes[1][0], make(chan struct{})}, output{pipes[2][0], make(chan struct{})})
		stdin := pipes[0][1]
		go func() {
			_, _ = io.Copy(stdin, ss.ch)
			stdin.Close() // end of file for the command
		}()
	}

	ss.mu.Lock()
	proc, wait, err := startProcess(ss.srv.cfg.Reaper, argv[0], argv, attr)
	if err == nil {
		ss.proc = proc
	}
	ss.mu.Unlock()
	for _, f := range closeAfterStart {
		f.Close()
	}
	if err != nil {
		ss.srv.cfg.logf("exec %q: %v", argv, err)
		for _, o := range outs {
			o.f.Close()
		}
		return false, nil
	}

	return true, func() {
		if ss.master != nil {
			go func() { _, _ = io.Copy(ss.master, ss.ch) }()
			go copyOutput(ss.ch, outs[0])
		} else {
			go copyOutput(ss.ch, outs[0])
			go copyOutput(ss.ch.Stderr(), outs[1])
		}
		go func() {
			ws := wait()
			ss.mu.Lock()
			ss.exited = true
			ss.mu.Unlock()
			drain(outs)
			ss.exit(ws)
		}()
	}
}

// copyOutput copies o to w until end of file (or EIO, a pty's end) or an error, then closes o: a command that
// writes on gets a broken pipe, as it would under OpenSSH when the client has gone.
func copyOutput(w io.Writer, o output) {
	_, _ = io.Copy(w, o.f)
	o.f.Close()
	close(o.done)
}

// drain waits, after the command exited, for its outputs to reach end of file; an output that is still open
// once outputGrace has passed and that holds no unread bytes is closed (a background process holds it).
func drain(outs []output) {
	deadline := time.Now().Add(outputGrace)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for _, o := range outs {
	wait:
		for {
			select {
			case <-o.done:
				break wait
			case <-tick.C:
				if time.Now().After(deadline) && pendingBytes(o.f) == 0 {
					o.f.Close()
					<-o.done
					break wait
				}
			}
		}
	}
}

// exit reports the command's end to the client and closes the channel.
func (ss *session) exit(ws unix.WaitStatus) {
	switch {
	case ws.Signaled():
		if name := signalName(int(ws.Signal())); name != "" {
			_, _ = ss.ch.SendRequest("exit-signal", false, ssh.Marshal(exitSignalMsg{Signal: name, CoreDumped: ws.CoreDump()}))
		} else {
			_, _ = ss.ch.SendRequest("exit-status", false, ssh.Marshal(exitStatusMsg{Status: 128 + uint32(ws.Signal())}))
		}
	default:
		_, _ = ss.ch.SendRequest("exit-status", false, ssh.Marshal(exitStatusMsg{Status: uint32(ws.ExitStatus())}))
	}
	_ = ss.ch.CloseWrite()
	_ = ss.ch.Close()
}

// signal delivers sig to the command's process group, while the command lives (its pid, not yet reaped, cannot
// name another group).
func (ss *session) signal(sig syscall.Signal) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.proc == nil || ss.exited {
		return false
	}
	return unix.Kill(-ss.proc.Pid, sig) == nil
}

// keepOpen is a channel whose Close does nothing.
type keepOpen struct{ ssh.Channel }

func (keepOpen) Close() error { return nil }

// sftp serves the sftp subsystem on the channel, in the agent's process, rooted at / and starting in root's home;
// exact, the ExactSFTP subsystem, with no working folder.
func (ss *session) sftp(exact bool) {
	status := uint32(0)
	var opts []sftp.ServerOption
	if !exact {
		opts = append(opts, sftp.WithServerWorkingDirectory(workDir()))
	}
	// The server closes what it is given when it ends; the channel must
	// stay open for the exit status.
	srv, err := sftp.NewServer(keepOpen{ss.ch}, opts...)
	if err == nil {
		err = srv.Serve()
		srv.Close()
	}
	if err != nil && !errors.Is(err, io.EOF) {
		ss.srv.cfg.logf("sftp: %v", err)
		status = 1
	}
	_, _ = ss.ch.SendRequest("exit-status", false, ssh.Marshal(exitStatusMsg{Status: status}))
	_ = ss.ch.Close()
}
