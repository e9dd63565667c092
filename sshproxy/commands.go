package sshproxy

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"

	"golang.org/x/crypto/ssh"
)

// CommandUser is the user name that runs boxd's own commands instead of
// reaching a box: ssh boxd@host COMMAND (see Commands). No box may have
// it as its name.
const CommandUser = "boxd"

// Commands is what the proxy needs to run boxd's commands for the user
// CommandUser. Without it (Server.Commands nil), CommandUser is a box
// name like any other.
type Commands interface {
	// CommandKeys returns the public keys that may run commands. The
	// proxy refuses any other key exactly as it refuses a wrong key for a
	// box.
	CommandKeys(ctx context.Context) ([]ssh.PublicKey, error)
	// RunCommand runs cmd and returns its exit status, once its output is
	// written. A command it will not run (unknown, malformed) is a line
	// on cmd.Stderr and a status, as is a failure to run it at all.
	// ctx ends when the person closes the session or disconnects.
	RunCommand(ctx context.Context, cmd Command) int
}

// Command is one command a person asked the proxy to run.
type Command struct {
	// Key is the SHA256 fingerprint of the key the person signed with,
	// one of Commands.CommandKeys.
	Key string
	// Line is the command line as the person's SSH client sent it (""
	// for a login shell).
	Line string
	// Addr is the proxy's address the person reached (host:port).
	Addr string
	// Stdout and Stderr go to the person's session.
	Stdout, Stderr io.Writer
}

// serveCommands serves a connection of CommandUser: each session runs one
// command (exec, or a shell, which is the empty command); nothing else is
// offered. It returns when the person disconnects or ctx ends.
func (s *Server) serveCommands(ctx context.Context, sconn *ssh.ServerConn, chans <-chan ssh.NewChannel, key string, log *slog.Logger) {
	var sessions sync.WaitGroup
	defer sessions.Wait()
	for nch := range chans {
		if nch.ChannelType() != "session" {
			_ = nch.Reject(ssh.Prohibited, "boxd: user "+CommandUser+" runs boxd's commands only; ssh NAME@host reaches box NAME")
			continue
		}
		ch, reqs, err := nch.Accept()
		if err != nil {
			continue
		}
		sessions.Go(func() {
			s.commandSession(ctx, ch, reqs, Command{Key: key, Addr: sconn.LocalAddr().String()}, log)
		})
	}
}

// commandSession runs the one command of a session: its output, then its
// exit status, then the channel's close.
func (s *Server) commandSession(ctx context.Context, ch ssh.Channel, reqs <-chan *ssh.Request, cmd Command, log *slog.Logger) {
	defer ch.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// What the person types is not read by any command; it is drained so
	// that their client never waits for room to send it.
	go func() { _, _ = io.Copy(io.Discard, ch) }()

	start := make(chan string, 1)
	var pty bool // set before start is sent, read after it is received
	go func() {
		started := false
		for r := range reqs {
			ok := false
			switch r.Type {
			case "pty-req":
				// OpenSSH's -t asks for one: the output is then written
				// as a terminal would show it.
				if !started {
					pty, ok = true, true
				}
			case "exec", "shell":
				if started {
					break
				}
				var line string
				if r.Type == "exec" {
					var p struct{ Command string }
					if ssh.Unmarshal(r.Payload, &p) != nil {
						break
					}
					line = p.Command
				}
				started, ok = true, true
				start <- line
			}
			if r.WantReply {
				_ = r.Reply(ok, nil)
			}
		}
		// The person closed the session: the command ends with it.
		cancel()
	}()

	var line string
	select {
	case line = <-start:
	case <-ctx.Done():
		return
	}
	cmd.Line, cmd.Stdout, cmd.Stderr = line, io.Writer(ch), ch.Stderr()
	if pty {
		// A terminal's one stream, with its newlines as CR LF.
		out := &terminalWriter{w: ch}
		cmd.Stdout, cmd.Stderr = out, out
	}
	log.Info("ssh command", "command", line)
	code := s.Commands.RunCommand(ctx, cmd)
	log.Info("ssh command done", "command", line, "exit", code)
	_, _ = ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{uint32(code)}))
	_ = ch.CloseWrite()
}

// terminalWriter writes what a command writes as a terminal (a pty with
// onlcr) passes it on: each LF as CR LF. Writes of stdout and stderr
// share it.
type terminalWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (t *terminalWriter) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := t.w.Write(bytes.ReplaceAll(p, []byte("\n"), []byte("\r\n"))); err != nil {
		return 0, err
	}
	return len(p), nil
}
