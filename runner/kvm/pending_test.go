package kvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// gate holds the background writes of pending snapshots: each write waits
// until the gate opens, and the first failN writes fail.
type gate struct {
	open  chan struct{}
	mu    sync.Mutex
	failN int
	tries map[string]int
}

func newGate(failN int) *gate {
	return &gate{open: make(chan struct{}), failN: failN, tries: map[string]int{}}
}

func (g *gate) before(name string) error {
	<-g.open
	g.mu.Lock()
	defer g.mu.Unlock()
	g.tries[name]++
	if g.failN > 0 {
		g.failN--
		return errors.New("injected write failure")
	}
	return nil
}

func (g *gate) triesOf(name string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.tries[name]
}

// TestForkBeforeCommit forks from snapshots still on their way to the
// store: children restore at once from host memory with the parent's exact
// memory, the snapshots reach the store (after a failed write, written
// again), and restores from the store then give the same memory.
func TestForkBeforeCommit(t *testing.T) {
	for _, tc := range []struct {
		name     string
		failN    int  // background writes that fail
		grandkid bool // a child forks again before its parent's snapshot is written
	}{
		{name: "written in the background"},
		{name: "written again after a failed write", failN: 1},
		{name: "fork of a fork, both pending", grandkid: true},
		{name: "fork of a fork, failed writes", failN: 2, grandkid: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, g := newRunner(t)
			defer r.Close()
			gt := newGate(tc.failN)
			r.beforeCommit = gt.before
			ctx := context.Background()
			pm, err := r.Start(ctx, spec(32<<20))
			if err != nil {
				t.Fatal(err)
			}
			parent := pm.(*Machine)
			defer parent.Stop(ctx)
			if _, err := parent.Report(ctx); err != nil {
				t.Fatal(err)
			}
			if err := parent.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := parent.Snapshot(ctx, "base", runner.SnapshotOptions{}); err != nil {
				t.Fatal(err)
			}
			// Dirty some memory, then fork while paused, so that the
			// parent's memory stays what the fork saw.
			if _, err := parent.Report(ctx); err != nil {
				t.Fatal(err)
			}
			if err := parent.fill(0, 300); err != nil {
				t.Fatal(err)
			}
			if err := parent.Pause(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := parent.SnapshotForFork(ctx, "f1", runner.SnapshotOptions{Incremental: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := g.Get("f1"); err == nil {
				t.Fatal("f1 is in the store before its write was let through")
			}
			if got := r.Pending(); len(got) != 2 || got[0] != "f1" || got[1] != "base" {
				t.Fatalf("Pending() = %q, want [f1 base]", got)
			}
			want := map[string][]byte{"f1": readAll(t, parent)}

			kid := restorePaused(t, r, "f1")
			defer kid.Stop(ctx)
			if !bytes.Equal(readAll(t, kid), want["f1"]) {
				t.Fatal("a child of a pending snapshot has memory other than its parent's")
			}
			names := []string{"f1"}
			if tc.grandkid {
				if err := kid.Continue(ctx); err != nil {
					t.Fatal(err)
				}
				if err := kid.fill(100, 200); err != nil {
					t.Fatal(err)
				}
				if err := kid.Pause(ctx); err != nil {
					t.Fatal(err)
				}
				if _, err := kid.SnapshotForFork(ctx, "f2", runner.SnapshotOptions{Incremental: true}); err != nil {
					t.Fatal(err)
				}
				want["f2"] = readAll(t, kid)
				gk := restorePaused(t, r, "f2")
				defer gk.Stop(ctx)
				if !bytes.Equal(readAll(t, gk), want["f2"]) {
					t.Fatal("a grandchild of pending snapshots has memory other than its parent's")
				}
				names = append(names, "f2")
			}

			close(gt.open)
			// Flush writes a failed snapshot once more, and says so if
			// that fails too: with failN failures, some Flush among the
			// first failN+1 succeeds.
			for range tc.failN + 1 {
				if err = r.Flush(ctx); err == nil {
					break
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			if p := r.Pending(); len(p) != 0 {
				t.Fatalf("pending after Flush: %q", p)
			}
			for _, n := range names {
				s, err := g.Get(n)
				if err != nil {
					t.Fatalf("%s after Flush: %v", n, err)
				}
				if tc.failN == 0 && gt.triesOf(n) != 1 {
					t.Fatalf("%s written %d times, want once", n, gt.triesOf(n))
				}
				m, _ := s.Map("memory")
				t.Logf("%s: parent %s, %d pages changed, written in %d tries", n, s.Parent, m.Changed, gt.triesOf(n))
				k := restorePaused(t, r, n)
				if !bytes.Equal(readAll(t, k), want[n]) {
					t.Fatalf("a restore of %s from the store differs from the machine it was taken of", n)
				}
				_ = k.Stop(ctx)
			}
			res, err := g.Verify(ctx, nil)
			if err != nil || !res.OK() {
				t.Fatalf("store: %v %+v", err, res)
			}
		})
	}
}

// TestSnapshotWaitsForPendingParent takes a plain snapshot on top of a
// fork's snapshot whose background write fails once: the snapshot writes
// its parent again first, and chains to it.
func TestSnapshotWaitsForPendingParent(t *testing.T) {
	r, g := newRunner(t)
	defer r.Close()
	gt := newGate(1)
	close(gt.open)
	r.beforeCommit = gt.before
	ctx := context.Background()
	pm, err := r.Start(ctx, spec(32<<20))
	if err != nil {
		t.Fatal(err)
	}
	m := pm.(*Machine)
	defer m.Stop(ctx)
	if _, err := m.Snapshot(ctx, "base", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.SnapshotForFork(ctx, "f1", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.SnapshotForFork(ctx, "f1", runner.SnapshotOptions{Incremental: true}); err == nil {
		t.Fatal("a second f1 was taken while the first is pending")
	}
	s, err := m.Snapshot(ctx, "s2", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	if s.Parent != "f1" {
		t.Fatalf("s2's parent is %q, want f1", s.Parent)
	}
	if _, err := g.Get("f1"); err != nil {
		t.Fatalf("f1 is not in the store once a snapshot on it is: %v", err)
	}
	if n := gt.triesOf("f1"); n != 2 {
		t.Fatalf("f1 written %d times, want 2 (one failure, one retry)", n)
	}
}

// TestForkCrashBeforeCommit kills a process whose fork snapshot is not
// written yet: the store keeps every snapshot committed before, intact and
// restorable, and lacks only the fork's.
func TestForkCrashBeforeCommit(t *testing.T) {
	requireKVM(t)
	root := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BOXD_TEST_FORK_CRASH="+root)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the crashing process: %v, want killed; output:\n%s", err, out)
	}
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	if _, err := g.Get("fork"); err == nil {
		t.Fatal("the fork's snapshot is in the store, though the process died before writing it")
	}
	for _, n := range []string{"base", "inc"} {
		if _, err := g.Get(n); err != nil {
			t.Fatalf("committed snapshot %s lost: %v", n, err)
		}
	}
	res, err := g.Verify(context.Background(), nil)
	if err != nil || !res.OK() {
		t.Fatalf("store after the crash: %v %+v", err, res)
	}
	r := &Runner{Graph: g, Command: []string{os.Args[0]}, Env: []string{"BOXD_TEST_VMM=1"}, Dir: t.TempDir()}
	defer r.Close()
	ctx := context.Background()
	m, err := r.Restore(ctx, "inc", runner.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Stop(ctx)
	if _, err := m.(*Machine).Report(ctx); err != nil {
		t.Fatalf("the machine restored from the last committed snapshot: %v", err)
	}
}

// crashAfterFork runs in the child process of TestForkCrashBeforeCommit:
// it commits two snapshots into root, forks, and is killed as the fork's
// snapshot is about to be written.
func crashAfterFork(root string) error {
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	r := &Runner{Graph: g, Command: []string{os.Args[0]}, Env: []string{"BOXD_TEST_VMM=1"}, Dir: root}
	r.beforeCommit = func(string) error {
		return syscall.Kill(os.Getpid(), syscall.SIGKILL)
	}
	ctx := context.Background()
	m, err := r.Start(ctx, spec(32<<20))
	if err != nil {
		return err
	}
	km := m.(*Machine)
	if _, err := km.Snapshot(ctx, "base", runner.SnapshotOptions{}); err != nil {
		return err
	}
	if err := km.fill(0, 100); err != nil {
		return err
	}
	if _, err := km.Snapshot(ctx, "inc", runner.SnapshotOptions{Incremental: true}); err != nil {
		return err
	}
	if err := km.fill(0, 100); err != nil {
		return err
	}
	if _, err := km.SnapshotForFork(ctx, "fork", runner.SnapshotOptions{Incremental: true}); err != nil {
		return err
	}
	r.writers.Wait() // killed before it returns
	return fmt.Errorf("the fork's snapshot was written")
}

// restorePaused restores snap paused.
func restorePaused(t *testing.T, r *Runner, snap string) *Machine {
	t.Helper()
	m, err := r.Restore(context.Background(), snap, runner.RestoreOptions{Paused: true})
	if err != nil {
		t.Fatal(err)
	}
	return m.(*Machine)
}
