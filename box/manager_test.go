package box_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// The box manager on the fake runner (fake_test.go): every lifecycle step,
// without root, QEMU or a guest, in seconds. integration/ and box_test.go
// run the same steps on real Linux boxes under QEMU.

const fakeImage = "fake-image"

type fakeEnv struct {
	root string
	g    *snapshotter.Graph
	r    *fakeRunner
	mgr  *box.Manager
}

// newFakeEnv is a manager of a new root whose only runner is a fake one,
// with an image and a kernel file, so that boxes can be created.
func newFakeEnv(t *testing.T, forker bool) *fakeEnv {
	t.Helper()
	return newFakeEnvWith(t, forker, nil)
}

// newFakeEnvWith is newFakeEnv with the manager's Config adjusted by adjust.
func newFakeEnvWith(t *testing.T, forker bool, adjust func(*box.Config)) *fakeEnv {
	t.Helper()
	root := t.TempDir()
	g, err := snapshotter.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close() })
	ctx := context.Background()
	if _, err := g.Ingest(ctx, bytes.NewReader(bytes.Repeat([]byte("root file system\n"), 4096)), snapshotter.IngestOptions{
		Name: guest.SnapshotName(fakeImage), Labels: map[string]string{guest.LabelImage: fakeImage},
	}); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(root, "vmlinuz")
	if err := os.WriteFile(kernel, []byte("a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	agentBin := filepath.Join(root, "boxd-agent")
	testutil.WriteELF(t, agentBin) // static: it is only put in an initramfs
	t.Setenv(guest.AgentEnv, agentBin)
	r := newFakeRunner(t, g, forker)
	cfg := box.Config{Root: root, Graph: g, Kernel: kernel, Runners: []runner.Runner{r}}
	if adjust != nil {
		adjust(&cfg)
	}
	mgr, err := box.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mgr.Close(context.Background()) })
	return &fakeEnv{root: root, g: g, r: r, mgr: mgr}
}

func (e *fakeEnv) create(t *testing.T, name string) box.Box {
	t.Helper()
	bx, err := e.mgr.Create(context.Background(), box.CreateOptions{Name: name, Image: fakeImage, Keys: []string{keyA}})
	if err != nil {
		t.Fatalf("Create %s: %v", name, err)
	}
	return bx
}

// machine is box name's current fake machine.
func (e *fakeEnv) machine(t *testing.T, name string) *fakeMachine {
	t.Helper()
	e.r.mu.Lock()
	defer e.r.mu.Unlock()
	for i := len(e.r.machines) - 1; i >= 0; i-- {
		m := e.r.machines[i]
		if h, _, _ := m.sys.get(); h == name && m.Err() == nil {
			return m
		}
	}
	t.Fatalf("no running machine has hostname %s", name)
	return nil
}

func (e *fakeEnv) state(t *testing.T, name string) box.Box {
	t.Helper()
	bx, err := e.mgr.Get(name)
	if err != nil {
		t.Fatalf("Get %s: %v", name, err)
	}
	return bx
}

func TestFakeCreateExecStopStart(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	bx := e.create(t, "dev")
	if bx.State != box.StateRunning || bx.Runner != "fake" || bx.Image != fakeImage {
		t.Fatalf("created box: %+v, want running on the fake runner", bx)
	}
	m := e.machine(t, "dev")
	if _, id, entropy := m.sys.get(); len(id) != 32 || entropy == 0 {
		t.Fatalf("a new box's machine-id %q, entropy %d bytes: want both", id, entropy)
	}
	if got := run(ctx, t, e.mgr, "dev", "echo hello"); got != "hello\n" {
		t.Fatalf("exec: %q", got)
	}
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: fakeImage}); !errors.Is(err, box.ErrExists) {
		t.Fatalf("second create of dev: %v, want ErrExists", err)
	}
	// More memory than the host has is refused up front, and nothing is kept.
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "huge", Image: fakeImage, Memory: 5 << 40}); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "more than this host's") {
		t.Fatalf("create of a 5 TiB box: %v, want ErrInvalidArgument naming the host's RAM", err)
	}
	if _, err := e.mgr.Get("huge"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("a refused box was recorded: %v", err)
	}
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "x", Image: fakeImage, Runner: "qemu"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("create on a runner the manager lacks: %v, want ErrInvalidArgument", err)
	}
	if bx, err := e.mgr.Stop(ctx, "dev"); err != nil || bx.State != box.StateStopped {
		t.Fatalf("Stop: %+v, %v", bx, err)
	}
	if m.Err() == nil {
		t.Fatal("the machine still runs after Stop")
	}
	if bx, err := e.mgr.Start(ctx, "dev"); err != nil || bx.State != box.StateRunning {
		t.Fatalf("Start: %+v, %v", bx, err)
	}
	if got := run(ctx, t, e.mgr, "dev", "echo again"); got != "again\n" {
		t.Fatalf("exec after start: %q", got)
	}
	if _, ok := e.mgr.CPUTime("dev"); !ok {
		t.Fatal("no CPU time for a running box on a runner.CPUMeter")
	}
	if bx, err := e.mgr.Pause(ctx, "dev"); err != nil || bx.State != box.StatePaused {
		t.Fatalf("Pause: %+v, %v", bx, err)
	}
	run(ctx, t, e.mgr, "dev", "true") // a use unpauses it
	if got := e.state(t, "dev").State; got != box.StateRunning {
		t.Fatalf("state after an exec of a paused box: %s", got)
	}
}

// Fork with and without runner.Forker: the children run, each unique; the
// parent runs on; the snapshot is released once the children started.
func TestFakeFork(t *testing.T) {
	for _, forker := range []bool{false, true} {
		t.Run(map[bool]string{false: "snapshot-and-restores", true: "forker"}[forker], func(t *testing.T) {
			e := newFakeEnv(t, forker)
			ctx := context.Background()
			e.create(t, "dev")
			before := time.Now()
			kids, err := e.mgr.Fork(ctx, "dev", []string{"a", "b"})
			if err != nil {
				t.Fatalf("Fork: %v", err)
			}
			parent := e.state(t, "dev")
			if parent.State != box.StateRunning || !strings.HasPrefix(parent.Snapshot, "box.dev.") {
				t.Fatalf("parent after fork: %+v", parent)
			}
			// The snapshot paused the parent: its clock is set again.
			if c := e.machine(t, "dev").sys.clockSet(); c.Before(before) {
				t.Fatalf("the parent's clock was last set at %v, before the fork", c)
			}
			ids := map[string]bool{}
			for _, k := range kids {
				if k.State != box.StateRunning || k.Parent != "dev" || k.Snapshot != parent.Snapshot || k.Runner != "fake" {
					t.Fatalf("child %+v: want running, a fork of dev from %s", k, parent.Snapshot)
				}
				_, id, _ := e.machine(t, k.Name).sys.get()
				ids[id] = true
				if got := run(ctx, t, e.mgr, k.Name, "echo $((6*7))"); got != "42\n" {
					t.Fatalf("exec in %s: %q", k.Name, got)
				}
			}
			if len(ids) != 2 {
				t.Fatalf("the children share a machine-id: %v", ids)
			}
			if !slices.Contains(e.r.released, parent.Snapshot) {
				t.Fatalf("the fork's snapshot %s was not released after the restores (released %v)", parent.Snapshot, e.r.released)
			}
			var restored []string
			for _, rs := range e.r.restores {
				if rs.LongLived {
					t.Fatalf("a fork restored as long-lived: %+v", rs)
				}
				restored = append(restored, rs.Snapshot)
			}
			if !slices.Equal(restored, []string{parent.Snapshot, parent.Snapshot}) {
				t.Fatalf("restores %v, want two of %s", restored, parent.Snapshot)
			}
			e.r.mu.Lock()
			spares, pending := e.r.spares, len(e.r.pending)
			e.r.mu.Unlock()
			if forker && (spares == 0 || pending == 0) {
				t.Fatalf("on a runner.Forker: %d spares asked for, %d snapshots pending: want spares and the fork's snapshot written in the background", spares, pending)
			}
			if !forker && spares != 0 {
				t.Fatalf("spares asked of machines without runner.Forker: %d", spares)
			}
			if forker {
				// The snapshot's write and the parent's next spares wait until the children started.
				e.r.mu.Lock()
				writeAfter, atRestore := e.r.writeAfter, e.r.atRestore
				e.r.mu.Unlock()
				if writeAfter == nil || !closed(writeAfter) {
					t.Fatalf("the fork's snapshot had no WriteAfter, or it is still open after Fork returned (nil: %v)", writeAfter == nil)
				}
				if len(atRestore) != 2 {
					t.Fatalf("%d restores seen after the fork's snapshot, want 2", len(atRestore))
				}
				for i, st := range atRestore {
					if st.writeReleased || st.spares == spares {
						t.Fatalf("restore %d of 2 saw the snapshot's write released (%v), or the parent's new spares asked for already (%d of %d)",
							i+1, st.writeReleased, st.spares, spares)
					}
				}
			}
			if err := e.mgr.Flush(ctx); err != nil || len(e.r.Pending()) != 0 {
				t.Fatalf("Flush: %v, pending %v", err, e.r.Pending())
			}
			if _, err := e.mgr.Fork(ctx, "dev", []string{"a"}); !errors.Is(err, box.ErrExists) {
				t.Fatalf("fork onto an existing name: %v, want ErrExists", err)
			}
		})
	}
}

// Hibernate stops the machine and keeps its disk in the snapshot's layer;
// Resume restores it long-lived on a new disk, with the same identity.
func TestFakeHibernateResume(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	mach := e.machine(t, "dev")
	_, id, _ := mach.sys.get()
	bx, err := e.mgr.Hibernate(ctx, "dev")
	if err != nil || bx.State != box.StateHibernated {
		t.Fatalf("Hibernate: %+v, %v", bx, err)
	}
	// Nothing the guest does after its snapshot is kept: it must not run on (its agent link would hold bytes
	// the snapshot does not, and could not resume).
	if mach.ranAfterSnapshot() {
		t.Fatal("the machine ran on after its hibernation snapshot")
	}
	s, err := e.g.Get(bx.Snapshot)
	if err != nil || s.Labels[box.LabelBox] != "dev" {
		t.Fatalf("the hibernation snapshot %s: %+v, %v", bx.Snapshot, s, err)
	}
	if bx.Disk != s.Labels[fakeDiskLabel] {
		t.Fatalf("a hibernated box's disk %s, want the layer its snapshot froze, %s", bx.Disk, s.Labels[fakeDiskLabel])
	}
	if _, err := e.mgr.Stop(ctx, "dev"); !errors.Is(err, box.ErrInvalidState) {
		t.Fatalf("Stop of a hibernated box: %v, want ErrInvalidState", err)
	}
	bx, err = e.mgr.Resume(ctx, "dev")
	if err != nil || bx.State != box.StateRunning {
		t.Fatalf("Resume: %+v, %v", bx, err)
	}
	last := e.r.restores[len(e.r.restores)-1]
	if !last.LongLived || last.Snapshot != s.Name {
		t.Fatalf("resume restored %+v, want %s long-lived", last, s.Name)
	}
	if chain := e.r.DiskChain(bx.Disk); len(chain) < 2 || chain[1] != s.Labels[fakeDiskLabel] {
		t.Fatalf("the resumed box's disk chain %v, want it over %s", chain, s.Labels[fakeDiskLabel])
	}
	e.r.mu.Lock()
	resumed := e.r.machines[len(e.r.machines)-1]
	e.r.mu.Unlock()
	// The guest keeps its hostname and machine-id (in its memory and
	// disk): the resume sets neither, only entropy and the clock.
	if h, newID, entropy := resumed.sys.get(); h != "" || newID != "" || entropy == 0 || id == "" {
		t.Fatalf("a resume asked for hostname %q, machine-id %q, %d bytes of entropy: want only entropy", h, newID, entropy)
	}
	// Client resumes a hibernated box on its own (an SSH connection).
	if _, err := e.mgr.Hibernate(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if got := run(ctx, t, e.mgr, "dev", "echo awake"); got != "awake\n" {
		t.Fatalf("exec of a hibernated box: %q", got)
	}
}

// A snapshot that fails (a full disk) leaves the box running; once there
// is room it hibernates.
func TestFakeHibernateDiskFull(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	e.r.setSnapErr(errdefs.ErrResourceExhausted)
	if _, err := e.mgr.Hibernate(ctx, "dev"); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("Hibernate on a full disk: %v, want errdefs.ErrResourceExhausted", err)
	}
	if got := e.state(t, "dev").State; got != box.StateRunning {
		t.Fatalf("after a failed hibernation the box is %s, want running", got)
	}
	if e.machine(t, "dev").isPaused() {
		t.Fatal("after a failed hibernation the machine stays paused")
	}
	run(ctx, t, e.mgr, "dev", "true")
	e.r.setSnapErr(nil)
	if bx, err := e.mgr.Hibernate(ctx, "dev"); err != nil || bx.State != box.StateHibernated {
		t.Fatalf("Hibernate with room: %+v, %v", bx, err)
	}
}

func TestFakeHibernateIfIdle(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	if _, did, err := e.mgr.HibernateIfIdle(ctx, "dev", func() bool { return false }); did || err != nil {
		t.Fatalf("a busy box: hibernated %v, %v", did, err)
	}
	if _, did, err := e.mgr.HibernateIfIdle(ctx, "dev", func() bool { return true }); !did || err != nil {
		t.Fatalf("an idle box: hibernated %v, %v", did, err)
	}
	asked := false
	if _, did, _ := e.mgr.HibernateIfIdle(ctx, "dev", func() bool { asked = true; return true }); did || asked {
		t.Fatalf("a hibernated box: hibernated again %v, idle asked %v", did, asked)
	}
}

// A machine that exits unasked leaves its box stopped, saying why; the
// next use boots it.
func TestFakeMachineDies(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	e.machine(t, "dev").die(errors.New("fake: killed"))
	deadline := time.Now().Add(10 * time.Second)
	for e.state(t, "dev").State != box.StateStopped {
		if time.Now().After(deadline) {
			t.Fatalf("a box whose machine died is still %s", e.state(t, "dev").State)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if note := e.state(t, "dev").Note; !strings.Contains(note, "fake: killed") {
		t.Fatalf("the note of a box whose machine died: %q", note)
	}
	if got := run(ctx, t, e.mgr, "dev", "echo back"); got != "back\n" {
		t.Fatalf("exec after the machine died: %q", got)
	}
}

// Remove keeps what other boxes stand on, and once every box is gone
// leaves no box snapshot and no disk file behind.
func TestFakeRemoveCollects(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	if _, err := e.mgr.Snapshot(ctx, "dev", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Fork(ctx, "dev", []string{"kid"}); err != nil {
		t.Fatal(err)
	}
	kid := e.state(t, "kid")
	if err := e.mgr.Remove(ctx, "dev"); err != nil {
		t.Fatalf("Remove dev: %v", err)
	}
	if _, err := e.mgr.Get("dev"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("Get of a removed box: %v", err)
	}
	for _, f := range e.r.DiskChain(kid.Disk) {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("removing dev removed %s, which kid's disk stands on: %v", f, err)
		}
	}
	if _, err := e.g.Get(kid.Snapshot); err != nil {
		t.Fatalf("removing dev removed the snapshot kid stands on: %v", err)
	}
	if got := run(ctx, t, e.mgr, "kid", "echo still"); got != "still\n" {
		t.Fatalf("kid after dev's removal: %q", got)
	}
	if err := e.mgr.Remove(ctx, "kid"); err != nil {
		t.Fatalf("Remove kid: %v", err)
	}
	snaps, err := e.g.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, "box.") {
			t.Errorf("snapshot %s left after every box was removed", s.Name)
		}
	}
	if len(e.r.removed) == 0 {
		t.Error("the runner was told of no removed snapshot")
	}
	left, _ := os.ReadDir(filepath.Join(e.root, "disks"))
	for _, f := range left {
		t.Errorf("disk file %s left after every box was removed", f.Name())
	}
	if err := e.mgr.Remove(ctx, "kid"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("Remove of a removed box: %v", err)
	}
}

// A box made from a snapshot has the snapshot's machine, runner and image.
func TestFakeCreateFrom(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	s, err := e.mgr.Snapshot(ctx, "dev", "base")
	if err != nil {
		t.Fatal(err)
	}
	bx, err := e.mgr.CreateFrom(ctx, box.FromOptions{Name: "copy", Snapshot: s.Name, Keys: []string{keyB}})
	if err != nil {
		t.Fatalf("CreateFrom: %v", err)
	}
	if bx.State != box.StateRunning || bx.Parent != "dev" || bx.Runner != "fake" || bx.Image != fakeImage || bx.Memory != box.DefaultMemory {
		t.Fatalf("box from a snapshot: %+v", bx)
	}
	if h, _, _ := e.machine(t, "copy").sys.get(); h != "copy" {
		t.Fatalf("hostname %q", h)
	}
	if _, err := e.mgr.CreateFrom(ctx, box.FromOptions{Name: "img", Snapshot: guest.SnapshotName(fakeImage)}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("CreateFrom an image: %v, want ErrInvalidArgument", err)
	}
}

var _ = agent.Command{}

// What does not fit the host's memory, less the reserve, is refused before
// anything is made; what fits goes ahead. Forks count one shared image.
func TestFakeAdmission(t *testing.T) {
	e := newFakeEnvWith(t, false, func(c *box.Config) {
		c.HostMemory = func() (int64, error) { return 4 << 30, nil }
		c.Reserve = 1 << 30
	})
	ctx := context.Background()
	e.create(t, "dev") // 512 MiB
	for _, tc := range []struct {
		what string
		do   func() error
	}{
		{"a 3 GiB box", func() error {
			_, err := e.mgr.Create(ctx, box.CreateOptions{Name: "big", Image: fakeImage, Memory: 3 << 30})
			return err
		}},
		{"24 forks", func() error {
			names := make([]string, 24)
			for i := range names {
				names[i] = "kid-" + strings.Repeat("x", i+1)
			}
			_, err := e.mgr.Fork(ctx, "dev", names)
			return err
		}},
	} {
		snapsBefore, _ := e.g.List()
		machinesBefore := len(e.r.machines)
		err := tc.do()
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "GiB available; boxd keeps 1.0 GiB in reserve") {
			t.Fatalf("%s on a host with 4 GiB free: %v, want ErrResourceExhausted saying what is available", tc.what, err)
		}
		boxes, _ := e.mgr.List()
		snapsAfter, _ := e.g.List()
		if len(boxes) != 1 || len(snapsAfter) != len(snapsBefore) || len(e.r.machines) != machinesBefore {
			t.Fatalf("%s was refused but changed things: boxes %d, snapshots %d -> %d, machines %d -> %d",
				tc.what, len(boxes), len(snapsBefore), len(snapsAfter), machinesBefore, len(e.r.machines))
		}
	}
	// 512 MiB shared and 10 machines of 128 MiB fit in 3 GiB.
	names := make([]string, 10)
	for i := range names {
		names[i] = "ok-" + strings.Repeat("y", i+1)
	}
	if _, err := e.mgr.Fork(ctx, "dev", names); err != nil {
		t.Fatalf("a fork that fits: %v", err)
	}
}

// A create or fork whose machines do not start leaves no record and no
// disk file behind; a resume that fails leaves the box hibernated.
func TestFakeFailuresLeaveNothing(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	disks := func() []string {
		entries, _ := os.ReadDir(filepath.Join(e.root, "disks"))
		var out []string
		for _, d := range entries {
			out = append(out, d.Name())
		}
		return out
	}
	e.r.setStartErr(errors.New("fake: no machine today"))
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: fakeImage}); err == nil || !strings.Contains(err.Error(), "no machine today") {
		t.Fatalf("create whose machine fails: %v", err)
	}
	if boxes, _ := e.mgr.List(); len(boxes) != 0 || len(disks()) != 0 {
		t.Fatalf("a failed create left boxes %+v and disks %v", boxes, disks())
	}
	e.r.setStartErr(nil)
	e.create(t, "dev")
	before := disks()
	e.r.setStartErr(errors.New("fake: no machine today"))
	if _, err := e.mgr.Fork(ctx, "dev", []string{"a", "b"}); err == nil || !strings.Contains(err.Error(), "a: ") || !strings.Contains(err.Error(), "b: ") {
		t.Fatalf("fork whose machines fail: %v, want it to name both", err)
	}
	if boxes, _ := e.mgr.List(); len(boxes) != 1 {
		t.Fatalf("a failed fork left boxes: %+v", boxes)
	}
	for _, d := range disks() {
		if strings.HasPrefix(d, "a-") || strings.HasPrefix(d, "b-") {
			t.Fatalf("a failed fork left disk %s (before: %v)", d, before)
		}
	}
	e.r.setStartErr(nil)
	if _, err := e.mgr.Hibernate(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	e.r.setStartErr(errors.New("fake: no machine today"))
	if _, err := e.mgr.Resume(ctx, "dev"); err == nil {
		t.Fatal("a resume whose machine fails succeeded")
	}
	if bx := e.state(t, "dev"); bx.State != box.StateHibernated {
		t.Fatalf("after a failed resume: %+v, want it hibernated", bx)
	}
	e.r.setStartErr(nil)
	run(ctx, t, e.mgr, "dev", "true")
}

func TestFakeConsolePath(t *testing.T) {
	e := newFakeEnv(t, false)
	e.create(t, "dev")
	got, err := e.mgr.ConsolePath("dev")
	if want := filepath.Join(e.root, "boxes", "dev", "console.log"); err != nil || got != want {
		t.Fatalf("ConsolePath of dev: %q, %v; want %q", got, err, want)
	}
	if _, err := e.mgr.ConsolePath("nope"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("ConsolePath of an unknown box: %v, want ErrNotFound", err)
	}
	if err := e.mgr.Remove(context.Background(), "dev"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.ConsolePath("dev"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("ConsolePath of a removed box: %v, want ErrNotFound", err)
	}
}

// A console over ConsoleMax is trimmed to its last ConsoleKeep bytes, from a
// line's start, when a machine of the box starts.
func TestFakeConsoleTrimmed(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	e.create(t, "dev")
	if _, err := e.mgr.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(e.root, "boxes", "dev", "console.log")
	var b strings.Builder
	for i := 0; b.Len() <= box.ConsoleMax; i++ {
		fmt.Fprintf(&b, "console line %d\n", i)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Start(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > box.ConsoleKeep || len(got) < box.ConsoleKeep-100 || !strings.HasPrefix(string(got), "console line ") || !strings.HasSuffix(b.String(), string(got)) {
		t.Fatalf("console after a start: %d bytes starting %q; want the last %d bytes of the old one, from a line's start", len(got), got[:min(len(got), 40)], box.ConsoleKeep)
	}
}
