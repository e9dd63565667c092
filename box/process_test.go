package box_test

import (
	"context"
	"errors"
	"testing"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/containerd/errdefs"
)

// Calls about kept processes that already run do not boot a stopped box:
// its processes ended with its machine, and a cold boot has none.
func TestFakeKeptProcessesOfStoppedBox(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	if _, err := e.mgr.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"attach", func() error {
			_, err := e.mgr.Process(ctx, "dev", agent.ProcessSpec{ID: "init", Attach: true}, agent.ProcessIO{})
			return err
		}},
		{"list", func() error { _, err := e.mgr.Processes(ctx, "dev"); return err }},
		{"signal", func() error { return e.mgr.SignalProcess(ctx, "dev", "init", 15) }},
		{"forget", func() error { return e.mgr.ForgetProcess(ctx, "dev", "init") }},
	} {
		if err := tc.call(); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s on a stopped box: %v, want not found", tc.name, err)
		}
		if st := e.state(t, "dev").State; st != box.StateStopped {
			t.Fatalf("%s booted the stopped box: %s", tc.name, st)
		}
	}
}
