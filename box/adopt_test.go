package box_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/runner"
)

// A manager closed with LeaveRunning leaves its boxes running; the next
// manager on the root adopts their machines (runner.Adopter) and reaches
// their agents again, and marks stopped, saying why, a box whose machine
// ended meanwhile; its next use boots it.
func TestAdoptLeftRunning(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	e.create(t, "gone")
	e.create(t, "nap")
	if _, err := e.mgr.Pause(ctx, "nap"); err != nil {
		t.Fatal(err)
	}
	dev, gone := e.machine(t, "dev"), e.machine(t, "gone")
	if err := e.mgr.LeaveRunning(ctx); err != nil {
		t.Fatal(err)
	}
	if dev.Err() != nil {
		t.Fatalf("dev's machine ended with LeaveRunning: %v", dev.Err())
	}
	gone.die(errors.New("killed while no boxd ran"))

	mgr, err := box.Open(box.Config{Root: e.root, Graph: e.g, Kernel: filepath.Join(e.root, "vmlinuz"), Runners: []runner.Runner{e.r}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mgr.Close(ctx) })
	e.mgr = mgr
	if bx := e.state(t, "dev"); bx.State != box.StateRunning || bx.Note != "" {
		t.Fatalf("dev after the manager came back: %s (%q), want running", bx.State, bx.Note)
	}
	if bx := e.state(t, "nap"); bx.State != box.StatePaused {
		t.Fatalf("nap after the manager came back: %s (%q), want paused", bx.State, bx.Note)
	}
	if m := e.machine(t, "dev"); m != dev {
		t.Fatalf("dev runs in machine %s, want the adopted %s", m.id, dev.id)
	}
	if code, err := mgr.Exec(ctx, "dev", agent.Command{Args: []string{"true"}}); err != nil || code != 0 {
		t.Fatalf("exec in an adopted box: %d, %v", code, err)
	}
	bx := e.state(t, "gone")
	if bx.State != box.StateStopped || !strings.Contains(bx.Note, "its machine ended meanwhile") {
		t.Fatalf("gone, whose machine ended while no manager ran: %s (%q), want stopped with the reason", bx.State, bx.Note)
	}
	if code, err := mgr.Exec(ctx, "gone", agent.Command{Args: []string{"true"}}); err != nil || code != 0 {
		t.Fatalf("exec in gone (a cold boot): %d, %v", code, err)
	}
	if bx := e.state(t, "gone"); bx.State != box.StateRunning {
		t.Fatalf("gone after its next use: %s (%q), want running", bx.State, bx.Note)
	}
}
