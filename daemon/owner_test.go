package daemon

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// TestOwnerScope checks that a request for a registered key sees and acts
// on that key's boxes alone, another's box being "no such box" in the very
// words of a box that does not exist, and that what is not about its boxes
// is refused.
func TestOwnerScope(t *testing.T) {
	ctx := context.Background()
	keys, err := OpenKeyRegistry(filepath.Join(t.TempDir(), KeysName))
	if err != nil {
		t.Fatal(err)
	}
	alice, aliceFP := newKeyLine(t, "alice")
	bob, bobFP := newKeyLine(t, "bob")
	if _, err := keys.Add([]string{alice, bob}); err != nil {
		t.Fatal(err)
	}
	m := newFakeManager(
		box.Box{Name: "mine", State: box.StateRunning, Owner: aliceFP},
		box.Box{Name: "theirs", State: box.StateRunning, Owner: bobFP},
		box.Box{Name: "host", State: box.StateRunning},
	)
	g := &fakeGraph{snaps: []snapshotter.Snapshot{
		{Name: "box.mine.1", Labels: map[string]string{box.LabelBox: "mine"}},
		{Name: "box.theirs.1", Labels: map[string]string{box.LabelBox: "theirs"}},
		{Name: "box.host.1", Labels: map[string]string{box.LabelBox: "host"}},
	}}
	srv := NewServer(ctx, Options{Manager: m, Graph: g, Keys: keys, Events: events.New(0)})
	host := serve(t, srv)
	c := host.ForOwner(aliceFP)

	names := func(boxes []box.Box) []string {
		var out []string
		for _, b := range boxes {
			out = append(out, b.Name)
		}
		return out
	}
	if boxes, err := c.List(ctx); err != nil || !slices.Equal(names(boxes), []string{"mine"}) {
		t.Fatalf("list: %v, %v", names(boxes), err)
	}
	if boxes, err := host.List(ctx); err != nil || len(boxes) != 3 {
		t.Fatalf("the host's list: %v, %v", names(boxes), err)
	}

	// Every operation on another's box, or the host's, says what it says
	// of a box that does not exist.
	ops := map[string]func(name string) error{
		"get":       func(n string) error { _, err := c.Get(ctx, n); return err },
		"rm":        func(n string) error { return c.Remove(ctx, n) },
		"fork":      func(n string) error { _, err := c.Fork(ctx, n, []string{"copy"}); return err },
		"hibernate": func(n string) error { _, err := c.Hibernate(ctx, n); return err },
		"resume":    func(n string) error { _, err := c.Resume(ctx, n); return err },
		"stop":      func(n string) error { _, err := c.Stop(ctx, n); return err },
		"snapshots": func(n string) error { _, err := c.Snapshots(ctx, n); return err },
		"report":    func(n string) error { _, err := c.Report(ctx, n); return err },
	}
	for op, fn := range ops {
		missing := fn("nosuch")
		if !errors.Is(missing, errdefs.ErrNotFound) {
			t.Fatalf("%s of a box that does not exist: %v", op, missing)
		}
		for _, n := range []string{"theirs", "host"} {
			err := fn(n)
			if !errors.Is(err, errdefs.ErrNotFound) || strings.ReplaceAll(err.Error(), n, "nosuch") != missing.Error() {
				t.Errorf("%s %s: %v; want it as %q", op, n, err, missing)
			}
		}
	}
	for _, n := range []string{"theirs", "host"} {
		if _, err := m.lookup(n); err != nil {
			t.Fatalf("box %s is gone: %v", n, err)
		}
	}
	if trees, err := c.AllSnapshots(ctx); err != nil || len(trees) != 1 || trees[0].Box != "mine" {
		t.Fatalf("snapshots: %+v, %v", trees, err)
	}
	if rep, err := c.Report(ctx); err != nil || len(rep.Boxes) != 1 || rep.Boxes[0].Box != "mine" {
		t.Fatalf("report: %+v, %v", rep, err)
	}

	// A box made for the key admits the key alone, and its forks are the
	// key's.
	bx, err := c.Create(ctx, CreateRequest{Name: "new"})
	if err != nil || bx.Owner != aliceFP || len(bx.Keys) != 1 || !strings.HasPrefix(alice, bx.Keys[0]) {
		t.Fatalf("create: %+v, %v", bx, err)
	}
	if kids, err := c.Fork(ctx, "new", []string{"new-1"}); err != nil || len(kids) != 1 || kids[0].Owner != aliceFP {
		t.Fatalf("fork: %+v, %v", kids, err)
	}
	if boxes, _ := c.List(ctx); !slices.Equal(names(boxes), []string{"mine", "new", "new-1"}) {
		t.Fatalf("list after create and fork: %v", names(boxes))
	}
	if boxes, _ := host.ForOwner(bobFP).List(ctx); !slices.Equal(names(boxes), []string{"theirs"}) {
		t.Fatalf("the other key's list: %v", names(boxes))
	}
	for _, req := range []CreateRequest{{Name: "k", Keys: []string{bob}}, {Name: "f", From: "box.theirs.1"}} {
		if _, err := c.Create(ctx, req); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("create %+v: %v, want invalid argument", req, err)
		}
	}
	for _, cl := range []*Client{c, host} {
		if _, err := cl.Create(ctx, CreateRequest{Name: "boxd"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("a box named boxd: %v", err)
		}
		if _, err := cl.Fork(ctx, "mine", []string{"boxd"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("a fork named boxd: %v", err)
		}
	}

	// What is not about the key's boxes is refused, even for its own box.
	refused := map[string]error{}
	_, refused["exec"] = c.Exec(ctx, "mine", []string{"true"}, nil)
	_, refused["snapshot"] = c.Snapshot(ctx, "mine", "")
	_, refused["process"] = c.ProcessStream(ctx, "mine", agent.ProcessSpec{ID: "p", Args: []string{"true"}}, agent.ProcessIO{})
	_, refused["processes"] = c.Processes(ctx, "mine")
	refused["process signal"] = c.SignalProcess(ctx, "mine", "p", 9)
	refused["process resize"] = c.ResizeProcess(ctx, "mine", "p", 9, 9)
	refused["process close-stdin"] = c.CloseProcessStdin(ctx, "mine", "p")
	refused["process forget"] = c.ForgetProcess(ctx, "mine", "p")
	_, refused["promote"] = c.Promote(ctx, "new", "new-1")
	refused["logs"] = c.Logs(ctx, "mine", LogsOptions{Tail: -1}, io.Discard)
	_, refused["gc"] = c.GC(ctx, 0)
	refused["events"] = c.Events(ctx, time.Time{}, func(events.Event) error { return nil })
	_, refused["keys"] = c.Keys(ctx)
	_, refused["keys add"] = c.AddKeys(ctx, []string{bob})
	_, refused["keys rm"] = c.RemoveKey(ctx, bobFP)
	for op, err := range refused {
		if !errors.Is(err, errdefs.ErrPermissionDenied) {
			t.Errorf("%s for a registered key: %v, want permission denied", op, err)
		}
	}
	// A key that is not registered (or no longer) is refused everything.
	if _, err := keys.Remove(bobFP); err != nil {
		t.Fatal(err)
	}
	if _, err := host.ForOwner(bobFP).List(ctx); !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Fatalf("list for a key no longer registered: %v", err)
	}

	// The host sees the owners and counts each key's boxes.
	got, err := host.Keys(ctx)
	if err != nil || len(got) != 1 || got[0].Fingerprint != aliceFP || got[0].Boxes != 3 || got[0].Comment != "alice" {
		t.Fatalf("keys: %+v, %v", got, err)
	}
	if _, err := host.RemoveKey(ctx, "SHA256:nosuch"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("rm of an unknown key: %v", err)
	}
	if k, err := host.RemoveKey(ctx, aliceFP); err != nil || k.Fingerprint != aliceFP {
		t.Fatalf("rm: %+v, %v", k, err)
	}
}
