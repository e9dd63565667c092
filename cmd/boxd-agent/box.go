//go:build linux

package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/errcat"
)

const boxUsage = `usage: box COMMAND   (inside a box: asks boxd on the host, through the box's agent)

  box fork [--count N] [--json]   fork this box N ways (default 1); returns in the parent, printing
                                  "parent NAME...", and in each child, printing "child I of N NAME"
                                  (also in ` + agent.ForkFile + `)
  box ls [--json]                 this box's family: its parent, itself, its forks and theirs
  box exec NAME -- CMD...         run CMD in NAME (this box or a fork of it), streaming its output;
                                  exits with its status
  box cp NAME:PATH DEST           copy file PATH of NAME (this box or a fork of it) to DEST (- for stdout)
  box rm NAME                     remove NAME, a fork of this box or of its forks
  box hibernate                   hibernate this box a second after answering (the next SSH connection
                                  or exec resumes it)`

// boxMain runs the box command and returns its exit code.
func boxMain(args []string, stdout, stderr io.Writer) int {
	code, err := boxRun(args, stdout, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "box:", err)
	}
	return code
}

// usageErr is a wrong command line.
type usageErr string

func (e usageErr) Error() string { return string(e) }

func boxRun(args []string, stdout, stderr io.Writer) (int, error) {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stdout, boxUsage)
		if len(args) == 0 {
			return 2, nil
		}
		return 0, nil
	}
	req, asJSON, dest, err := parseBox(args)
	if err != nil {
		return 2, fmt.Errorf("%w (box --help)", err)
	}
	conn, err := net.Dial("unix", agent.BoxSocket)
	if err != nil {
		return 8, fmt.Errorf("the agent does not serve the box command here (is this a box?): %w", err)
	}
	defer conn.Close()
	line, err := json.Marshal(req)
	if err != nil {
		return 1, err
	}
	if _, err := conn.Write(append(line, '\n')); err != nil {
		return 8, err
	}
	out := stdout
	var file *os.File
	if req.Op == agent.OpCopy && dest != "-" {
		if file, err = os.Create(dest); err != nil {
			return 3, err
		}
		out = file
	}
	last, err := readFrames(conn, out, stderr)
	if file != nil {
		if cerr := file.Close(); err == nil && last.Error == "" {
			err = cerr
		}
		if err != nil || last.Error != "" {
			_ = os.Remove(dest)
		}
	}
	if err != nil {
		return 8, err
	}
	if last.Error != "" {
		code := errcat.ExitFailure
		if r, ok := errcat.Named(last.Category); ok {
			code = r.Exit
		}
		return code, errors.New(strings.TrimPrefix(last.Error, "box: "))
	}
	return report(req, last, asJSON, stdout)
}

// parseBox reads the box command's arguments into a request.
func parseBox(args []string) (req agent.HostRequest, asJSON bool, dest string, err error) {
	req.Op = args[0]
	rest := args[1:]
	flags := func(allowed ...string) ([]string, error) {
		var pos []string
		for i := 0; i < len(rest); i++ {
			a := rest[i]
			switch {
			case a == "--json" && contains(allowed, "json"):
				asJSON = true
			case (a == "--count" || a == "-n") && contains(allowed, "count"):
				if i+1 == len(rest) {
					return nil, usageErr("--count needs a number")
				}
				i++
				n, err := strconv.Atoi(rest[i])
				if err != nil || n < 1 {
					return nil, usageErr(fmt.Sprintf("--count %q: want a whole number, at least 1", rest[i]))
				}
				req.Count = n
			case strings.HasPrefix(a, "--count=") && contains(allowed, "count"):
				n, err := strconv.Atoi(strings.TrimPrefix(a, "--count="))
				if err != nil || n < 1 {
					return nil, usageErr(fmt.Sprintf("%s: want a whole number, at least 1", a))
				}
				req.Count = n
			case strings.HasPrefix(a, "-"):
				return nil, usageErr(fmt.Sprintf("box %s: unknown flag %s", req.Op, a))
			default:
				pos = append(pos, a)
			}
		}
		return pos, nil
	}
	var pos []string
	switch req.Op {
	case agent.OpFork:
		req.Count = 1
		if pos, err = flags("count", "json"); err == nil && len(pos) != 0 {
			err = usageErr("box fork takes no names: the children are named after this box")
		}
	case agent.OpList:
		if pos, err = flags("json"); err == nil && len(pos) != 0 {
			err = usageErr("box ls takes no arguments")
		}
	case agent.OpHibernate:
		if pos, err = flags(); err == nil && len(pos) != 0 {
			err = usageErr("box hibernate takes no arguments: it hibernates this box")
		}
	case agent.OpRemove:
		if pos, err = flags("json"); err == nil && len(pos) != 1 {
			err = usageErr("usage: box rm NAME")
		}
		if err == nil {
			req.Box = pos[0]
		}
	case agent.OpExec:
		dash := -1
		for i, a := range rest {
			if a == "--" {
				dash = i
				break
			}
		}
		if dash != 1 || len(rest) < 3 {
			err = usageErr("usage: box exec NAME -- CMD...")
			break
		}
		req.Box, req.Args = rest[0], rest[2:]
	case agent.OpCopy:
		if len(rest) != 2 {
			err = usageErr("usage: box cp NAME:PATH DEST")
			break
		}
		name, path, ok := strings.Cut(rest[0], ":")
		if !ok || name == "" || !strings.HasPrefix(path, "/") {
			err = usageErr(fmt.Sprintf("box cp %s: want NAME:/absolute/path", rest[0]))
			break
		}
		req.Box, req.Path, dest = name, path, rest[1]
	default:
		err = usageErr(fmt.Sprintf("box: unknown command %q", req.Op))
	}
	return req, asJSON, dest, err
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// readFrames copies the output frames to stdout and stderr and returns the
// last frame.
func readFrames(r io.Reader, stdout, stderr io.Writer) (agent.HostFrame, error) {
	in := bufio.NewReader(r)
	for {
		line, err := in.ReadBytes('\n')
		if err != nil {
			return agent.HostFrame{}, fmt.Errorf("the agent ended the answer early: %w", err)
		}
		var f agent.HostFrame
		if err := json.Unmarshal(line, &f); err != nil {
			return agent.HostFrame{}, fmt.Errorf("a bad answer: %w", err)
		}
		if len(f.Stdout) > 0 {
			if _, err := stdout.Write(f.Stdout); err != nil {
				return agent.HostFrame{}, err
			}
		}
		if len(f.Stderr) > 0 {
			_, _ = stderr.Write(f.Stderr)
		}
		if f.Done {
			return f, nil
		}
	}
}

// ForkResult is the host's answer to a fork, in the parent.
type forkResult struct {
	Children []string `json:"children"`
}

// member is one box of the family, as box ls shows it.
type member struct {
	Name     string `json:"name"`
	State    string `json:"state"`
	Relation string `json:"relation"`
	Parent   string `json:"parent,omitempty"`
}

// report prints what a finished request answered.
func report(req agent.HostRequest, last agent.HostFrame, asJSON bool, stdout io.Writer) (int, error) {
	switch req.Op {
	case agent.OpExec:
		return last.Exit, nil
	case agent.OpCopy:
		return 0, nil
	case agent.OpFork:
		if c := last.Child; c != nil {
			if asJSON {
				return 0, json.NewEncoder(stdout).Encode(map[string]any{"role": "child", "index": c.Index, "count": c.Count, "parent": c.Parent, "name": c.Name})
			}
			fmt.Fprintf(stdout, "child %d of %d %s\n", c.Index, c.Count, c.Name)
			return 0, nil
		}
		var r forkResult
		if err := json.Unmarshal(last.Result, &r); err != nil {
			return 1, fmt.Errorf("a bad answer: %w", err)
		}
		if asJSON {
			return 0, json.NewEncoder(stdout).Encode(map[string]any{"role": "parent", "children": r.Children})
		}
		fmt.Fprintf(stdout, "parent %s\n", strings.Join(r.Children, " "))
		return 0, nil
	case agent.OpList:
		var family []member
		if err := json.Unmarshal(last.Result, &family); err != nil {
			return 1, fmt.Errorf("a bad answer: %w", err)
		}
		if asJSON {
			return 0, json.NewEncoder(stdout).Encode(family)
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSTATE\tRELATION\tFORKED FROM")
		for _, m := range family {
			p := m.Parent
			if p == "" {
				p = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", m.Name, m.State, m.Relation, p)
		}
		return 0, tw.Flush()
	case agent.OpRemove:
		if asJSON {
			return 0, json.NewEncoder(stdout).Encode(map[string]string{"removed": req.Box})
		}
		fmt.Fprintf(stdout, "removed %s\n", req.Box)
	case agent.OpHibernate:
		fmt.Fprintln(stdout, "hibernating: the next SSH connection resumes this box")
	}
	return 0, nil
}
