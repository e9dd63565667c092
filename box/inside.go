package box

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/events"
	"github.com/containerd/errdefs"
)

// DefaultMaxForks is how many live forks (theirs counted) a box may make
// from inside by default.
const DefaultMaxForks = 16

// hibernateGrace is how long box hibernate waits, after the guest read its
// answer, before the box hibernates.
const hibernateGrace = time.Second

// MaxMaxForks bounds Box.MaxForks, as a sanity check on the number (the
// host's memory bounds forks first).
const MaxMaxForks = 4096

// Member is one box of a box's family, as the box command inside sees it.
type Member struct {
	Name     string `json:"name"`
	State    string `json:"state"`
	Relation string `json:"relation"` // parent, self or fork (a fork of self or of its forks)
	Parent   string `json:"parent,omitempty"`
}

// ForkResult is the answer to a fork asked from inside, in the parent.
type ForkResult struct {
	Children []string `json:"children"`
}

// ErrNotAllowed is a box acting from inside beyond what its owner allowed:
// on a box that is not itself or its fork, or when it may not act at all.
var ErrNotAllowed = fmt.Errorf("not allowed from inside the box: %w", errdefs.ErrPermissionDenied)

// serveInside answers the box command run inside box name (agent.ChannelHost
// requests). A box acts only on itself and its own forks (and theirs), and
// only if it was allowed to (Box.Inside); its forks (theirs counted) are
// bounded by Box.MaxForks, and those of each of its ancestors by theirs.
func (m *Manager) serveInside(name string) agent.HostHandler {
	return func(ctx context.Context, req agent.HostRequest, stdout, stderr io.Writer) (agent.HostAnswer, error) {
		self, err := m.Get(name)
		if err != nil {
			return agent.HostAnswer{}, err
		}
		if !self.Inside {
			return agent.HostAnswer{}, fmt.Errorf("box %s may not ask boxd for anything from inside (it was created with --allow-fork-from-inside=false, or before boxes could): %w", name, ErrNotAllowed)
		}
		switch req.Op {
		case agent.OpFork:
			return m.forkInside(ctx, self, req.Count)
		case agent.OpList:
			fam, err := m.family(self)
			return agent.HostAnswer{Result: fam}, err
		case agent.OpExec:
			if err := m.mayReach(self, req.Box, true); err != nil {
				return agent.HostAnswer{}, err
			}
			if len(req.Args) == 0 {
				return agent.HostAnswer{}, fmt.Errorf("box exec: no command: %w", errdefs.ErrInvalidArgument)
			}
			code, err := m.Exec(ctx, req.Box, agent.Command{Args: req.Args, Stdout: stdout, Stderr: stderr})
			return agent.HostAnswer{Exit: code}, err
		case agent.OpCopy:
			if err := m.mayReach(self, req.Box, true); err != nil {
				return agent.HostAnswer{}, err
			}
			var errOut bytes.Buffer
			code, err := m.Exec(ctx, req.Box, agent.Command{Args: []string{"cat", "--", req.Path}, Stdout: stdout, Stderr: &errOut})
			if err == nil && code != 0 {
				err = fmt.Errorf("box cp %s:%s: %s", req.Box, req.Path, strings.TrimSpace(errOut.String()))
				if strings.Contains(errOut.String(), "No such file") {
					err = fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
				}
			}
			return agent.HostAnswer{}, err
		case agent.OpRemove:
			if err := m.mayReach(self, req.Box, false); err != nil {
				return agent.HostAnswer{}, err
			}
			return agent.HostAnswer{Result: map[string]string{"removed": req.Box}}, m.Remove(ctx, req.Box)
		case agent.OpHibernate:
			return agent.HostAnswer{After: func() {
				// The box command has its answer; the session that ran it
				// (an exec, an SSH command) gets a moment to report its
				// exit before the machine stops.
				time.Sleep(hibernateGrace)
				if _, err := m.hibernate(context.Background(), name, events.ReasonRequested); err != nil {
					m.log.Warn("box: hibernating from inside", "box", name, "err", err)
				}
			}}, nil
		default:
			return agent.HostAnswer{}, fmt.Errorf("box: unknown command %q: %w", req.Op, errdefs.ErrInvalidArgument)
		}
	}
}

// byName returns every box by name.
func (m *Manager) byName() (map[string]Box, error) {
	boxes, err := m.List()
	if err != nil {
		return nil, err
	}
	all := make(map[string]Box, len(boxes))
	for _, b := range boxes {
		all[b.Name] = b
	}
	return all, nil
}

// descends reports whether box b descends from ancestor (a fork of it, or
// of its forks), by the Parent links of all.
func descends(all map[string]Box, b, ancestor string) bool {
	seen := map[string]bool{}
	for p := all[b].Parent; p != "" && !seen[p]; p = all[p].Parent {
		if p == ancestor {
			return true
		}
		seen[p] = true
	}
	return false
}

// mayReach refuses target unless it is self (when selfToo) or one of
// self's forks (or theirs). A box other than self's parent (which box ls
// shows) is refused as unknown, so that a box learns nothing of the
// others.
func (m *Manager) mayReach(self Box, target string, selfToo bool) error {
	if err := ValidateName(target); err != nil {
		return err
	}
	if target == self.Name {
		if selfToo {
			return nil
		}
		return fmt.Errorf("box %s cannot remove itself from inside: %w", self.Name, ErrNotAllowed)
	}
	all, err := m.byName()
	if err != nil {
		return err
	}
	switch {
	case target == self.Parent:
		return fmt.Errorf("box %s may act only on itself and its own forks, not on its parent %s: %w", self.Name, target, ErrNotAllowed)
	case !descends(all, target, self.Name):
		return fmt.Errorf("%q: %w", target, ErrNotFound)
	}
	return nil
}

// family is self's parent, self, and its forks and theirs.
func (m *Manager) family(self Box) ([]Member, error) {
	all, err := m.byName()
	if err != nil {
		return nil, err
	}
	var fam []Member
	if p, ok := all[self.Parent]; ok {
		fam = append(fam, Member{Name: p.Name, State: p.State, Relation: "parent", Parent: p.Parent})
	}
	fam = append(fam, Member{Name: self.Name, State: self.State, Relation: "self", Parent: self.Parent})
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range all {
			if !yield(n) {
				return
			}
		}
	})
	for _, n := range names {
		if descends(all, n, self.Name) {
			b := all[n]
			fam = append(fam, Member{Name: b.Name, State: b.State, Relation: "fork", Parent: b.Parent})
		}
	}
	return fam, nil
}

// forkInside forks self count ways for the box command inside it: the
// children are named NAME-1, NAME-2, ... (the first numbers free), within
// the bounds of self's and each ancestor's MaxForks.
func (m *Manager) forkInside(ctx context.Context, self Box, count int) (agent.HostAnswer, error) {
	if count < 1 || count > MaxMaxForks {
		return agent.HostAnswer{}, fmt.Errorf("box fork --count %d: want 1 to %d: %w", count, MaxMaxForks, errdefs.ErrInvalidArgument)
	}
	all, err := m.byName()
	if err != nil {
		return agent.HostAnswer{}, err
	}
	for a := self; ; {
		live := 0
		for n := range all {
			if descends(all, n, a.Name) {
				live++
			}
		}
		if limit := a.MaxForks; live+count > limit {
			what := "its"
			if a.Name != self.Name {
				what = "its ancestor " + a.Name + "'s"
			}
			return agent.HostAnswer{}, fmt.Errorf("box %s cannot fork %d more: %s limit is %d live forks (forks of forks counted) and %d exist (--max-forks): %w",
				self.Name, count, what, limit, live, errdefs.ErrResourceExhausted)
		}
		p, ok := all[a.Parent]
		if !ok {
			break
		}
		a = p
	}
	var names []string
	for i := 1; len(names) < count; i++ {
		n := self.Name + "-" + strconv.Itoa(i)
		if len(n) > 63 {
			return agent.HostAnswer{}, fmt.Errorf("box %s: the name of its fork %s is over 63 characters: %w", self.Name, n, errdefs.ErrInvalidArgument)
		}
		if _, taken := all[n]; !taken {
			names = append(names, n)
		}
	}
	if _, err := m.Fork(ctx, self.Name, names); err != nil {
		return agent.HostAnswer{}, err
	}
	return agent.HostAnswer{Result: ForkResult{Children: names}}, nil
}
