package box_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/containerd/errdefs"
)

// ask sends req to the box manager as the box command inside box from.
func (e *fakeEnv) ask(t *testing.T, from string, req agent.HostRequest) (agent.HostAnswer, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	ans, err := e.mgr.ServeInside(from)(context.Background(), req, &out, &errOut)
	return ans, out.String(), err
}

// The box command inside a box: forks named after it, its family, exec and
// cp on itself and its forks only, rm of its forks only, the fork limit
// of it and of its ancestors, and a box not allowed to act at all.
func TestFakeInside(t *testing.T) {
	e := newFakeEnv(t, true)
	ctx := context.Background()
	e.create(t, "dev")
	e.create(t, "other")

	ans, _, err := e.ask(t, "dev", agent.HostRequest{Op: agent.OpFork, Count: 2})
	if err != nil {
		t.Fatalf("fork from inside: %v", err)
	}
	if r, _ := ans.Result.(box.ForkResult); strings.Join(r.Children, " ") != "dev-1 dev-2" {
		t.Fatalf("fork from inside made %+v, want dev-1 dev-2", ans.Result)
	}
	for _, n := range []string{"dev-1", "dev-2"} {
		if bx := e.state(t, n); bx.State != box.StateRunning || bx.Parent != "dev" || !bx.Inside || bx.MaxForks != box.DefaultMaxForks {
			t.Fatalf("%s: %+v, want a running fork of dev that inherits Inside and MaxForks", n, bx)
		}
	}
	// A fork of a fork, and names that skip what is taken.
	if _, _, err := e.ask(t, "dev-1", agent.HostRequest{Op: agent.OpFork, Count: 1}); err != nil {
		t.Fatalf("fork of a fork: %v", err)
	}
	ans, _, err = e.ask(t, "dev", agent.HostRequest{Op: agent.OpFork, Count: 1})
	if r, _ := ans.Result.(box.ForkResult); err != nil || strings.Join(r.Children, " ") != "dev-3" {
		t.Fatalf("second fork of dev: %+v, %v; want dev-3", ans.Result, err)
	}

	ans, _, err = e.ask(t, "dev-1", agent.HostRequest{Op: agent.OpList})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(ans.Result)
	var fam []box.Member
	_ = json.Unmarshal(b, &fam)
	var rel []string
	for _, m := range fam {
		rel = append(rel, m.Name+":"+m.Relation)
	}
	if got := strings.Join(rel, " "); got != "dev:parent dev-1:self dev-1-1:fork" {
		t.Fatalf("family of dev-1: %s", got)
	}

	if ans, out, err := e.ask(t, "dev", agent.HostRequest{Op: agent.OpExec, Box: "dev-1-1", Args: []string{"sh", "-c", "echo out; exit 3"}}); err != nil || ans.Exit != 3 || out != "out\n" {
		t.Fatalf("exec in a fork of a fork: exit %d, %q, %v", ans.Exit, out, err)
	}
	// The fake runner's guests run on the host's files.
	file := filepath.Join(t.TempDir(), "result")
	if err := os.WriteFile(file, []byte("42\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, out, err := e.ask(t, "dev-2", agent.HostRequest{Op: agent.OpCopy, Box: "dev-2", Path: file}); err != nil || out != "42\n" {
		t.Fatalf("cp of its own file: %q, %v", out, err)
	}

	for _, tc := range []struct {
		name string
		from string
		req  agent.HostRequest
		want error
	}{
		{"a child removes its parent", "dev-1", agent.HostRequest{Op: agent.OpRemove, Box: "dev"}, errdefs.ErrPermissionDenied},
		{"a child removes its sibling", "dev-1", agent.HostRequest{Op: agent.OpRemove, Box: "dev-2"}, errdefs.ErrNotFound},
		{"a box removes itself", "dev-2", agent.HostRequest{Op: agent.OpRemove, Box: "dev-2"}, errdefs.ErrPermissionDenied},
		{"exec in an unrelated box", "dev", agent.HostRequest{Op: agent.OpExec, Box: "other", Args: []string{"true"}}, errdefs.ErrNotFound},
		{"cp from the parent", "dev-1", agent.HostRequest{Op: agent.OpCopy, Box: "dev", Path: "/etc/hostname"}, errdefs.ErrPermissionDenied},
		{"an unknown box", "dev", agent.HostRequest{Op: agent.OpExec, Box: "nosuch", Args: []string{"true"}}, errdefs.ErrNotFound},
		{"a missing file", "dev", agent.HostRequest{Op: agent.OpCopy, Box: "dev", Path: "/no/such/file"}, errdefs.ErrNotFound},
		{"an unknown command", "dev", agent.HostRequest{Op: "explode"}, errdefs.ErrInvalidArgument},
		// dev has 4 forks (theirs counted): 13 more make 17.
		{"past dev's fork limit", "dev", agent.HostRequest{Op: agent.OpFork, Count: 13}, errdefs.ErrResourceExhausted},
		// dev-1 has one, but its ancestor dev's limit counts too.
		{"past an ancestor's fork limit", "dev-1", agent.HostRequest{Op: agent.OpFork, Count: 13}, errdefs.ErrResourceExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := e.ask(t, tc.from, tc.req); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := e.mgr.Get("dev"); err != nil {
		t.Fatalf("a refused removal removed: %v", err)
	}
	if _, _, err := e.ask(t, "dev-1", agent.HostRequest{Op: agent.OpRemove, Box: "dev-1-1"}); err != nil {
		t.Fatalf("rm of its own fork: %v", err)
	}
	if _, err := e.mgr.Get("dev-1-1"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("dev-1-1 after rm from inside: %v", err)
	}

	// A box not allowed to act from inside is refused everything.
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "locked", Image: fakeImage, NoInside: true}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.ask(t, "locked", agent.HostRequest{Op: agent.OpList}); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("ls inside a box without the allowance: %v", err)
	}
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "bad", Image: fakeImage, MaxForks: box.MaxMaxForks + 1}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("create with too high a fork limit: %v", err)
	}
}
