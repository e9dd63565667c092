// Package runnertest is the conformance suite every runner backend runs
// against itself, as containerd's snapshotter suite is for snapshotters.
package runnertest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Backend is what the suite needs from a backend under test.
type Backend struct {
	// New returns a runner on a fresh store (graph) for one check.
	New func(t *testing.T) (runner.Runner, *snapshotter.Graph)
	// Spec is a machine the backend can start: its test guest, which
	// Observer can see into.
	Spec     runner.Spec
	Observer runner.Observer
	// Successor, for a backend that is a runner.Adopter, makes r let go of
	// machine m as r's process ending would, and returns a runner on r's
	// folders and store, as the next process would make. Nil skips the
	// Adopter check.
	Successor func(t *testing.T, r runner.Runner, m runner.Machine) runner.Runner
}

// Suite runs every check against b.
func Suite(t *testing.T, b Backend) {
	checks := []struct {
		name string
		fn   func(t *testing.T, b Backend)
	}{
		{"StartRuns", checkStartRuns},
		{"PauseResume", checkPauseResume},
		{"SnapshotRestore", checkSnapshotRestore},
		{"ForkDiverges", checkForkDiverges},
		{"IncrementalChain", checkIncrementalChain},
		{"RestoreUnknown", checkRestoreUnknown},
		{"SnapshotNameTaken", checkSnapshotNameTaken},
		{"StopTwice", checkStopTwice},
		// The optional capabilities (capabilities.go): each check skips,
		// saying so, where the backend lacks the capability.
		{"Capabilities", checkCapabilities},
		{"Adopter", checkAdopter},
	}
	for _, c := range checks {
		t.Run(c.name, func(t *testing.T) { c.fn(t, b) })
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

func start(t *testing.T, r runner.Runner, spec runner.Spec) runner.Machine {
	t.Helper()
	m, err := r.Start(ctx(t), spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	return m
}

func restore(t *testing.T, r runner.Runner, snap string, opts runner.RestoreOptions) runner.Machine {
	t.Helper()
	m, err := r.Restore(ctx(t), snap, opts)
	if err != nil {
		t.Fatalf("Restore %s: %v", snap, err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	return m
}

func next(t *testing.T, b Backend, m runner.Machine) runner.Observation {
	t.Helper()
	o, err := b.Observer.Next(ctx(t), m)
	if err != nil {
		t.Fatalf("observing %s: %v", m.ID(), err)
	}
	return o
}

func checkStartRuns(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	o1 := next(t, b, m)
	o2 := next(t, b, m)
	if o2.Counter <= o1.Counter {
		t.Fatalf("counter did not grow: %d then %d", o1.Counter, o2.Counter)
	}
}

func checkPauseResume(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	next(t, b, m)
	for range 2 { // pausing twice is allowed
		if err := m.Pause(ctx(t)); err != nil {
			t.Fatalf("Pause: %v", err)
		}
	}
	o1 := next(t, b, m) // resumes
	if err := m.Continue(ctx(t)); err != nil {
		t.Fatalf("Continue of a running machine: %v", err)
	}
	o2 := next(t, b, m)
	if o2.Counter <= o1.Counter {
		t.Fatalf("counter did not grow after resume: %d then %d", o1.Counter, o2.Counter)
	}
}

// A machine restored from a snapshot of a paused machine takes the same
// next step as the machine itself.
func checkSnapshotRestore(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	next(t, b, m)
	if err := m.Pause(ctx(t)); err != nil {
		t.Fatal(err)
	}
	s, err := m.Snapshot(ctx(t), "s", runner.SnapshotOptions{})
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if got := s.Labels[runner.LabelRunner]; got != r.Name() {
		t.Errorf("snapshot label %s = %q, want the runner's name %q", runner.LabelRunner, got, r.Name())
	}
	c := restore(t, r, "s", runner.RestoreOptions{Paused: true})
	want := next(t, b, m)
	got := next(t, b, c)
	if got != want {
		t.Fatalf("restored machine's next step %+v, the original's %+v", got, want)
	}
}

// Two forks from one snapshot, given fresh entropy, go their own ways.
func checkForkDiverges(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	next(t, b, m)
	if _, err := m.Snapshot(ctx(t), "s", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	a := restore(t, r, "s", runner.RestoreOptions{Unique: true})
	c := restore(t, r, "s", runner.RestoreOptions{Unique: true})
	oa, oc := divergence(t, b, a, c)
	if oa.Checksum == oc.Checksum {
		t.Fatalf("two unique forks have the same memory after running: %+v", oa)
	}
	if _, err := a.Snapshot(ctx(t), "a", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatalf("snapshot of a fork: %v", err)
	}
	// The parent is unaffected by its forks.
	o1 := next(t, b, m)
	o2 := next(t, b, m)
	if o2.Counter <= o1.Counter {
		t.Fatal("the parent stopped running after the fork")
	}
}

// divergence observes two unique forks until their memories differ (their
// fresh entropy may reach the guests a few steps in), at most ten steps.
func divergence(t *testing.T, b Backend, a, c runner.Machine) (oa, oc runner.Observation) {
	t.Helper()
	for i := 0; i < 10 && (i < 3 || oa.Checksum == oc.Checksum); i++ {
		oa, oc = next(t, b, a), next(t, b, c)
	}
	return oa, oc
}

// Snapshots form a chain; every link restores.
func checkIncrementalChain(t *testing.T, b Backend) {
	r, g := b.New(t)
	m := start(t, r, b.Spec)
	names := []string{"c1", "c2", "c3"}
	for i, n := range names {
		next(t, b, m)
		snap, err := m.Snapshot(ctx(t), n, runner.SnapshotOptions{Incremental: i > 0})
		if err != nil {
			t.Fatalf("Snapshot %s: %v", n, err)
		}
		if i > 0 && snap.Parent != names[i-1] {
			t.Fatalf("snapshot %s has parent %q, want %q", n, snap.Parent, names[i-1])
		}
	}
	for _, n := range names {
		c := restore(t, r, n, runner.RestoreOptions{})
		next(t, b, c)
	}
	res, err := g.Verify(ctx(t), nil)
	if err != nil || !res.OK() {
		t.Fatalf("store after snapshots: %v %+v", err, res)
	}
}

func checkRestoreUnknown(t *testing.T, b Backend) {
	r, _ := b.New(t)
	if _, err := r.Restore(ctx(t), "no-such-snapshot", runner.RestoreOptions{}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Restore of an unknown snapshot: %v, want ErrNotFound", err)
	}
}

func checkSnapshotNameTaken(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	if _, err := m.Snapshot(ctx(t), "s", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Snapshot(ctx(t), "s", runner.SnapshotOptions{}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("second snapshot called s: %v, want ErrAlreadyExists", err)
	}
	next(t, b, m) // still running
}

func checkStopTwice(t *testing.T, b Backend) {
	r, _ := b.New(t)
	m := start(t, r, b.Spec)
	for range 2 {
		if err := m.Stop(ctx(t)); err != nil {
			t.Fatalf("Stop: %v", err)
		}
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if err := m.Pause(ctx(t)); err == nil {
		t.Fatal("Pause of a stopped machine succeeded")
	}
	if !errors.Is(m.Err(), runner.ErrStopped) {
		t.Fatalf("Err after Stop: %v, want runner.ErrStopped", m.Err())
	}
}
