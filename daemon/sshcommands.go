package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// sshCommand is one of boxd's commands that a registered key may run over
// SSH (ssh boxd@host COMMAND).
type sshCommand struct {
	minArgs, maxArgs int // positional arguments; maxArgs < 0: any number
	// flags are the command's flags allowed over SSH besides --json, each
	// saying whether it takes a value.
	flags map[string]bool
	usage string // after the command's name
	what  string // for help
}

// synopsis is the command's usage line, named name.
func (sc sshCommand) synopsis(name string) string {
	return strings.Join(strings.Fields(name+" "+sc.usage+" [--json]"), " ")
}

// sshCommands are the commands a registered key may run, by name. Each is
// boxd's command of the name, run for the key (OwnerEnv): it sees and acts
// on the key's boxes alone. Flags that would reach beyond them (--ssh-key
// reads the host's files, --from another box's snapshot) are left out.
var sshCommands = map[string]sshCommand{
	"ls":        {0, 0, nil, "", "list your boxes"},
	"create":    {1, 1, map[string]bool{"image": true, "memory": true, "cpus": true}, "NAME [--image IMAGE] [--memory 512M] [--cpus 1]", "make a box and boot it; it admits your key (ssh NAME@host)"},
	"fork":      {2, 2, map[string]bool{"count": true}, "SRC NEW [--count N]", "clone a running or hibernated box into new boxes"},
	"hibernate": {1, 1, nil, "NAME", "save a running box into the store and free its memory"},
	"resume":    {1, 1, nil, "NAME", "bring a hibernated box back"},
	"rm":        {1, 1, nil, "NAME", "stop a box and delete it"},
	"snapshots": {0, 1, nil, "[NAME]", "a box's snapshots (or all your boxes') as a tree"},
	"report":    {0, -1, nil, "[NAME...]", "the store's dedup report of your boxes' snapshots"},
}

// sshCommandNames are the names of sshCommands, sorted.
var sshCommandNames = slices.Sorted(func(yield func(string) bool) {
	for n := range sshCommands {
		if !yield(n) {
			return
		}
	}
})

// errSSHHelp is ParseSSHCommand's answer to "help".
var errSSHHelp = errors.New("help")

// ParseSSHCommand checks a command line a registered key sent (ssh
// boxd@host COMMAND) and returns boxd's arguments for it: a command of
// sshCommands, its flags and its positional arguments. The line is split
// into words as a shell splits them (quotes and backslashes), but nothing
// is expanded and no shell runs it: shell syntax (;, |, &, $, redirections)
// is refused. Every refusal is one line and matches
// errdefs.ErrInvalidArgument.
func ParseSSHCommand(line string) ([]string, error) {
	words, err := splitWords(line)
	if err != nil {
		return nil, err
	}
	if len(words) == 0 {
		return nil, sshUsage("give a command: ssh boxd@host COMMAND, where COMMAND is one of %s (ssh boxd@host help)", strings.Join(sshCommandNames, ", "))
	}
	if len(words) == 1 && words[0] == "help" {
		return nil, errSSHHelp
	}
	name := words[0]
	sc, ok := sshCommands[name]
	if !ok {
		return nil, sshUsage("%q is not one of the commands boxd runs over SSH: %s (ssh boxd@host help)", name, strings.Join(sshCommandNames, ", "))
	}
	usage := func() error {
		return sshUsage("usage: %s", sc.synopsis(name))
	}
	args := []string{name}
	var pos []string
	for i := 1; i < len(words); i++ {
		w := words[i]
		if !strings.HasPrefix(w, "-") || w == "-" {
			pos = append(pos, w)
			continue
		}
		flag, value, hasValue := strings.Cut(strings.TrimLeft(w, "-"), "=")
		takesValue, allowed := sc.flags[flag]
		if flag == "json" {
			allowed = true
		}
		if !allowed || w == "--" || strings.HasPrefix(w, "---") {
			return nil, sshUsage("%s: %s is not a flag boxd takes over SSH; usage: %s", name, w, sc.synopsis(name))
		}
		switch {
		case takesValue && !hasValue:
			if i+1 >= len(words) {
				return nil, sshUsage("%s: --%s needs a value; usage: %s", name, flag, sc.synopsis(name))
			}
			i++
			value, hasValue = words[i], true
		case !takesValue && hasValue:
			return nil, sshUsage("%s: --%s takes no value", name, flag)
		}
		if hasValue {
			args = append(args, "--"+flag+"="+value)
		} else {
			args = append(args, "--"+flag)
		}
	}
	if len(pos) < sc.minArgs || (sc.maxArgs >= 0 && len(pos) > sc.maxArgs) {
		return nil, usage()
	}
	return append(args, pos...), nil
}

// sshHelp is what ssh boxd@host help prints.
func sshHelp() string {
	var b strings.Builder
	b.WriteString("boxd's commands over SSH: ssh boxd@host COMMAND (each takes --json)\n")
	for _, n := range sshCommandNames {
		sc := sshCommands[n]
		fmt.Fprintf(&b, "  %-54s %s\n", strings.TrimSpace(n+" "+sc.usage), sc.what)
	}
	b.WriteString("Log in to a box you made with: ssh NAME@host\n")
	return b.String()
}

func sshUsage(format string, args ...any) error {
	return errcat.With(fmt.Errorf(format, args...), errdefs.ErrInvalidArgument)
}

// shellSyntax are the characters that mean more than a word to a shell:
// outside quotes, boxd refuses them rather than run a shell.
const shellSyntax = ";&|<>()$`\n"

// splitWords splits line into words as a POSIX shell does, without
// expanding anything: blanks separate words, '...' keeps everything,
// "..." keeps everything but \" \\ (and refuses $ and `), and a backslash
// outside quotes keeps the next character.
func splitWords(line string) ([]string, error) {
	var words []string
	var w strings.Builder
	inWord := false
	end := func() {
		if inWord {
			words = append(words, w.String())
		}
		w.Reset()
		inWord = false
	}
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == ' ' || c == '\t':
			end()
		case c == '\'':
			j := strings.IndexByte(line[i+1:], '\'')
			if j < 0 {
				return nil, sshUsage("the command has a ' without its closing '")
			}
			w.WriteString(line[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case c == '"':
			i++
			for ; i < len(line) && line[i] != '"'; i++ {
				switch d := line[i]; {
				case d == '$' || d == '`':
					return nil, sshUsage("%q in the command is shell syntax; boxd runs one command and expands nothing", string(d))
				case d == '\\' && i+1 < len(line) && strings.IndexByte("\"\\$`", line[i+1]) >= 0:
					i++
					w.WriteByte(line[i])
				default:
					w.WriteByte(d)
				}
			}
			if i >= len(line) {
				return nil, sshUsage(`the command has a " without its closing "`)
			}
			inWord = true
		case c == '\\':
			if i+1 >= len(line) {
				return nil, sshUsage("the command ends in a \\")
			}
			i++
			w.WriteByte(line[i])
			inWord = true
		case strings.IndexByte(shellSyntax, c) >= 0, c == '#' && !inWord:
			return nil, sshUsage("%q in the command is shell syntax; boxd runs one command, not a shell", string(c))
		default:
			w.WriteByte(c)
			inWord = true
		}
	}
	end()
	return words, nil
}

// commandGrace is how long a command whose person left has to end on
// SIGTERM before it is killed.
const commandGrace = 10 * time.Second

// commandRunner runs boxd's commands for the front door's user boxd: each
// is this binary's own command, in a process of its own, acting for the
// key (OwnerEnv) through the API.
type commandRunner struct {
	root string
	exe  string // boxd's binary
	keys *KeyRegistry
}

// CommandKeys returns the registered keys.
func (c *commandRunner) CommandKeys(context.Context) ([]ssh.PublicKey, error) {
	return c.keys.PublicKeys(), nil
}

// RunCommand runs cmd.Line as boxd's command for key cmd.Key: boxd
// --root ROOT COMMAND ARGS..., its output to the person's session and its
// exit status theirs. Its environment is the key and the address the
// person reached; nothing of the person's (their SSH env requests) reaches
// it.
func (c *commandRunner) RunCommand(ctx context.Context, cmd sshproxy.Command) int {
	args, err := ParseSSHCommand(cmd.Line)
	if errors.Is(err, errSSHHelp) {
		_, _ = io.WriteString(cmd.Stdout, sshHelp())
		return errcat.ExitSuccess
	}
	if err != nil {
		fmt.Fprintf(cmd.Stderr, "boxd: %v\n", err)
		return errcat.ExitCode(err)
	}
	if c.exe == "" {
		fmt.Fprintln(cmd.Stderr, "boxd: the daemon cannot find its own binary to run the command")
		return errcat.ExitFailure
	}
	p := exec.CommandContext(ctx, c.exe, append([]string{"--root", c.root}, args...)...)
	p.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", OwnerEnv + "=" + cmd.Key, FrontDoorEnv + "=" + cmd.Addr}
	p.Dir = "/"
	p.Stdout, p.Stderr = cmd.Stdout, cmd.Stderr
	p.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	// A person who leaves ends the command as ^C would; what it asked the
	// daemon to do goes on (box operations outlive their request).
	p.Cancel = func() error { return p.Process.Signal(syscall.SIGTERM) }
	p.WaitDelay = commandGrace
	err = p.Run()
	if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
		if code := ee.ExitCode(); code >= 0 {
			return code
		}
		return 128 + int(ee.Sys().(syscall.WaitStatus).Signal())
	}
	if err != nil {
		fmt.Fprintf(cmd.Stderr, "boxd: running the command: %v\n", err)
		return errcat.ExitFailure
	}
	return errcat.ExitSuccess
}
