package sshproxy

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/ssh"
)

// testCommands runs commands that echo what they were given: "exit N"
// exits N, "wait" waits for the session to end.
type testCommands struct {
	mu    sync.Mutex
	keys  []ssh.PublicKey
	calls []Command
}

func (c *testCommands) CommandKeys(context.Context) ([]ssh.PublicKey, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.keys, nil
}

func (c *testCommands) RunCommand(ctx context.Context, cmd Command) int {
	c.mu.Lock()
	c.calls = append(c.calls, Command{Key: cmd.Key, Line: cmd.Line, Addr: cmd.Addr})
	c.mu.Unlock()
	var code int
	if _, err := fmt.Sscanf(cmd.Line, "exit %d", &code); err == nil {
		fmt.Fprintf(cmd.Stderr, "exiting %d\n", code)
		return code
	}
	fmt.Fprintf(cmd.Stdout, "ran %q\n", cmd.Line)
	return 0
}

func TestCommands(t *testing.T) {
	registered, boxKey, stranger := newTestKey(t), newTestKey(t), newTestKey(t)
	cmds := &testCommands{keys: []ssh.PublicKey{registered.pub}}
	e := newTestEnvWith(t, func(s *Server) { s.Commands = cmds })
	e.backend.addBox("dev", boxKey.pub)

	for _, tc := range []struct {
		name    string
		extra   []string
		command string
		want    result
	}{
		{"a command", nil, "ls --json", result{stdout: "ran \"ls --json\"\n"}},
		{"its exit status", nil, "exit 3", result{stderr: "exiting 3\n", code: 3}},
		{"a shell is the empty command", []string{"-T"}, "", result{stdout: "ran \"\"\n"}},
		{"on a pty", []string{"-tt"}, "exit 4", result{stdout: "exiting 4\r\n", code: 4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := e.ssh(t, nil, []testKey{registered}, tc.extra, CommandUser, tc.command)
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	cmds.mu.Lock()
	last := cmds.calls[len(cmds.calls)-1]
	cmds.mu.Unlock()
	if last.Key != ssh.FingerprintSHA256(registered.pub) || last.Addr != fmt.Sprintf("127.0.0.1:%d", e.port) {
		t.Errorf("the command ran as %+v", last)
	}

	// An unregistered key is refused as a wrong key for a box is; a
	// registered key gets into no box that does not admit it, and a box's
	// key runs no command.
	var refusals []string
	for _, tc := range []struct {
		user string
		key  testKey
	}{{CommandUser, stranger}, {CommandUser, boxKey}, {"dev", stranger}, {"dev", registered}} {
		got := e.ssh(t, nil, []testKey{tc.key}, nil, tc.user, "ls")
		if got.code != 255 || got.stdout != "" {
			t.Fatalf("%s with another key: %+v, want a refusal", tc.user, got)
		}
		refusals = append(refusals, strings.ReplaceAll(got.stderr, tc.user+"@", "USER@"))
	}
	for _, r := range refusals[1:] {
		if r != refusals[0] {
			t.Errorf("refusals differ:\n%q\n%q", refusals[0], r)
		}
	}
	cmds.mu.Lock()
	n := len(cmds.calls)
	cmds.mu.Unlock()
	if n != 4 {
		t.Errorf("%d commands ran, want 4", n)
	}

	// Forwarding through the command user is refused.
	got := e.ssh(t, nil, []testKey{registered}, []string{"-o", "ExitOnForwardFailure=yes", "-W", "127.0.0.1:22"}, CommandUser, "")
	if got.code != 255 || got.stdout != "" {
		t.Errorf("ssh -W as %s: %+v", CommandUser, got)
	}
}

// TestCommandUserWithoutCommands checks that without Commands the command
// user is a box name like any other.
func TestCommandUserWithoutCommands(t *testing.T) {
	e := newTestEnv(t)
	owner := newTestKey(t)
	e.backend.addBox(CommandUser, owner.pub)
	if got := e.ssh(t, nil, []testKey{owner}, nil, CommandUser, "echo in"); got != (result{stdout: "in\n"}) {
		t.Fatalf("got %+v", got)
	}
}
