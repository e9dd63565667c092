package kvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/kvm/guest"
	"github.com/boxd-dev/boxd/runner/runnertest"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// guestPath is the conformance guest, built once for the package's tests.
var guestPath string

// TestMain builds the guest, and doubles as the VMM process: the runner
// under test starts this binary with BOXD_TEST_VMM=1; with
// BOXD_TEST_FORK_CRASH it is the process TestForkCrashBeforeCommit kills.
func TestMain(m *testing.M) {
	if os.Getenv("BOXD_TEST_VMM") == "1" {
		if err := ServeInherited(); err != nil {
			fmt.Fprintln(os.Stderr, "vmm:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	crashRoot := os.Getenv("BOXD_TEST_FORK_CRASH")
	dir, err := os.MkdirTemp(crashRoot, "boxd-guest")
	if err != nil {
		panic(err)
	}
	guestPath, err = guest.Build(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if crashRoot != "" {
		// The process TestForkCrashBeforeCommit kills.
		err := crashAfterFork(crashRoot)
		os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, "crash:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func newRunner(t *testing.T) (*Runner, *snapshotter.Graph) {
	t.Helper()
	requireKVM(t)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	return &Runner{Graph: g, Command: []string{os.Args[0]}, Env: []string{"BOXD_TEST_VMM=1"}, Dir: t.TempDir()}, g
}

func spec(mem int64) runner.Spec {
	return runner.Spec{MemSize: mem, Kernel: guestPath, Cmdline: "pages_per_tick=4 print_every=1000"}
}

// observer sees the conformance guest through its report port.
type observer struct{}

func (observer) Next(ctx context.Context, m runner.Machine) (runner.Observation, error) {
	km, ok := m.(*Machine)
	if !ok {
		return runner.Observation{}, fmt.Errorf("not a kvm machine: %T", m)
	}
	r, err := km.Report(ctx)
	return runner.Observation{Checksum: r.Checksum, Counter: r.Tick}, err
}

func TestConformance(t *testing.T) {
	runnertest.Suite(t, runnertest.Backend{
		New: func(t *testing.T) (runner.Runner, *snapshotter.Graph) {
			r, g := newRunner(t)
			return r, g
		},
		Spec:     spec(32 << 20),
		Observer: observer{},
	})
}

// TestFork: the guest runs and ticks; a snapshot restored in a new VMM
// process holds exactly the parent's memory and continues with the same
// checksum and counter; two forks continue from the same state, then
// diverge; an incremental snapshot stores about the pages dirtied; killing a
// VMM mid-snapshot leaves the store consistent.
func TestFork(t *testing.T) {
	r, g := newRunner(t)
	ctx := context.Background()
	pm, err := r.Start(ctx, spec(64<<20))
	if err != nil {
		t.Fatal(err)
	}
	parent := pm.(*Machine)
	defer parent.Stop(ctx)
	first, err := parent.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("parent runs: tick %d, checksum %#x", first.Tick, first.Checksum)

	if err := parent.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	base, err := parent.Snapshot(ctx, "base", runner.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, _ := base.Map("memory")
	t.Logf("full snapshot: %d pages, %d stored new, %d zero", m.Size/4096, m.NewChunks, m.ZeroChunks)

	var kids []*Machine
	for range 2 {
		k, err := r.Restore(ctx, "base", runner.RestoreOptions{Paused: true})
		if err != nil {
			t.Fatal(err)
		}
		defer k.Stop(ctx)
		kids = append(kids, k.(*Machine))
	}
	// Same memory, byte for byte, before anything runs (reading a child's
	// memory faults every page in through the runner's handler).
	want := readAll(t, parent)
	for i, k := range kids {
		if !bytes.Equal(readAll(t, k), want) {
			t.Fatalf("child %d's memory differs from its parent's", i)
		}
	}
	// Same next step.
	pr, err := parent.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range kids {
		kr, err := k.Report(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if kr != pr {
			t.Fatalf("child %d reports %+v, parent %+v", i, kr, pr)
		}
	}
	t.Logf("children continue from tick %d with checksum %#x", pr.Tick, pr.Checksum)

	// Then they diverge: each reseeded, each running on its own.
	for i, k := range kids {
		if err := k.call(request{Op: "reseed", Seed: uint64(1000 + i)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	var last []Report
	for _, k := range append(kids, parent) {
		var rep Report
		for range 3 {
			if rep, err = k.Report(ctx); err != nil {
				t.Fatal(err)
			}
		}
		last = append(last, rep)
	}
	if last[0].Checksum == last[1].Checksum || last[0].Checksum == last[2].Checksum || last[1].Checksum == last[2].Checksum {
		t.Fatalf("machines did not diverge: %+v", last)
	}

	// Incremental snapshot of the parent: about the pages it dirtied since
	// base (4 a tick, from tick pr.Tick-1).
	inc, err := parent.Snapshot(ctx, "inc", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	after, err := parent.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	im, _ := inc.Map("memory")
	ticks := after.Tick - pr.Tick
	t.Logf("incremental snapshot after ~%d ticks of 4 pages: %d pages changed, %d chunks new", ticks, im.Changed, im.NewChunks)
	if inc.Parent != "base" || im.Changed == 0 || uint64(im.Changed) > 4*ticks+16 {
		t.Fatalf("incremental snapshot: parent %q, %d changed pages for at most %d ticks (%d..%d)", inc.Parent, im.Changed, ticks, pr.Tick, after.Tick)
	}

	// The child's snapshot chains to base, and restores.
	ks, err := kids[0].Snapshot(ctx, "kid", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	if ks.Parent != "base" {
		t.Fatalf("child snapshot's parent %q, want base", ks.Parent)
	}

	// Kill a VMM in the middle of a snapshot: no half snapshot, store clean.
	victim, err := r.Restore(ctx, "kid", runner.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vm := victim.(*Machine)
	errc := make(chan error, 1)
	go func() {
		_, err := vm.Snapshot(ctx, "never", runner.SnapshotOptions{})
		errc <- err
	}()
	_ = syscall.Kill(vm.PID(), syscall.SIGKILL)
	<-vm.Done()
	if err := <-errc; err == nil {
		if _, gerr := g.Get("never"); gerr != nil {
			t.Fatalf("snapshot reported success but is missing: %v", gerr)
		}
	} else if _, gerr := g.Get("never"); gerr == nil {
		t.Fatal("a failed snapshot is visible")
	}
	res, err := g.Verify(ctx, nil)
	if err != nil || !res.OK() {
		t.Fatalf("store after killing a VMM: %v %+v", err, res)
	}
}

// readAll reads a machine's whole guest memory.
func readAll(t *testing.T, m *Machine) []byte {
	t.Helper()
	b := make([]byte, m.params.MemSize)
	if _, err := m.memory().ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestBadInput(t *testing.T) {
	r, _ := newRunner(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		spec runner.Spec
	}{
		{"memory not a multiple of 2 MiB", runner.Spec{MemSize: 3 << 20, Kernel: guestPath}},
		{"memory over 1 GiB", runner.Spec{MemSize: 2 << 30, Kernel: guestPath}},
		{"unknown option", runner.Spec{MemSize: 16 << 20, Kernel: guestPath, Cmdline: "colour=1"}},
		{"two vCPUs", runner.Spec{MemSize: 16 << 20, CPUs: 2, Kernel: guestPath}},
	} {
		if _, err := r.Start(ctx, tc.spec); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want ErrInvalidArgument", tc.name, err)
		}
	}
	if _, err := r.Start(ctx, runner.Spec{MemSize: 16 << 20, Kernel: filepath.Join(t.TempDir(), "none")}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing guest: %v", err)
	}
}

// A guest that crashes (an invalid opcode with no IDT: a triple fault)
// stops its machine with the exit reason; nothing panics.
func TestGuestCrash(t *testing.T) {
	r, _ := newRunner(t)
	bad := filepath.Join(t.TempDir(), "ud2.bin")
	if err := os.WriteFile(bad, []byte{0x0f, 0x0b}, 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := r.Start(context.Background(), runner.Spec{MemSize: 16 << 20, Kernel: bad})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Stop(context.Background())
	km := m.(*Machine)
	_, err = km.Report(context.Background())
	if err == nil {
		t.Fatal("a crashed guest reported")
	}
	select {
	case <-time.After(30 * time.Second):
		t.Fatal("the machine of a crashed guest is not done")
	case <-m.Done():
	}
	if !strings.Contains(m.Err().Error(), "triple fault") {
		t.Fatalf("machine error %q does not give the exit reason", m.Err())
	}
	t.Logf("crash reported as: %v", m.Err())
}

// A runner with warm VMM processes hands them out and stops the spares on
// Close.
func TestWarmPool(t *testing.T) {
	r, _ := newRunner(t)
	r.Pool = 2
	ctx := context.Background()
	m, err := r.Start(ctx, spec(16<<20))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Snapshot(ctx, "s", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPool(r)
	r.poolMu.Lock()
	spares := append([]*Machine(nil), r.pool...)
	r.poolMu.Unlock()
	c, err := r.Restore(ctx, "s", runner.RestoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.(*Machine) != spares[0] {
		t.Error("restore did not use a warm VMM")
	}
	if _, err := c.(*Machine).Report(ctx); err != nil {
		t.Fatal(err)
	}
	c.Stop(ctx)
	m.Stop(ctx)
	waitPool(r)
	r.poolMu.Lock()
	spares = append([]*Machine(nil), r.pool...)
	r.poolMu.Unlock()
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	for _, s := range spares {
		select {
		case <-s.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("spare VMM %s still running after Close", s.ID())
		}
	}
	after, err := r.Restore(ctx, "s", runner.RestoreOptions{})
	if err != nil {
		t.Fatalf("restore after Close (without the pool): %v", err)
	}
	after.Stop(ctx)
}

// TestPreparedVMM restores and boots on spare VMM processes that prepared
// a VM ahead: a restore of the prepared memory size takes it (no memory
// slot set up on the restore's path), another size builds its own, and a
// boot drops it; every machine runs.
func TestPreparedVMM(t *testing.T) {
	r, _ := newRunner(t)
	defer r.Close()
	ctx := context.Background()
	var spareOf *Machine
	for _, mem := range []int64{16 << 20, 32 << 20} {
		m, err := r.Start(ctx, spec(mem))
		if err != nil {
			t.Fatal(err)
		}
		defer m.Stop(ctx)
		if _, err := m.Snapshot(ctx, fmt.Sprintf("s%d", mem>>20), runner.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		spareOf = m.(*Machine)
	}
	for _, tc := range []struct {
		snap     string
		prepared int64 // the memory size the spare prepared
		boot     bool  // boot a fresh machine instead of restoring
		takes    bool  // the restore takes the prepared VM
	}{
		{snap: "s16", prepared: 16 << 20, takes: true},
		{snap: "s16", prepared: 32 << 20},
		{snap: "s32", prepared: 32 << 20, takes: true},
		{prepared: 16 << 20, boot: true},
	} {
		name := fmt.Sprintf("%s/prepared=%dMiB/boot=%v", tc.snap, tc.prepared>>20, tc.boot)
		t.Run(name, func(t *testing.T) {
			r.expect.Store(&Params{MemSize: tc.prepared, PagesPerTick: 4, PrintEvery: 1000})
			if err := spareOf.StartSpares(ctx, 1); err != nil {
				t.Fatal(err)
			}
			var m runner.Machine
			var err error
			if tc.boot {
				m, err = r.Start(ctx, spec(tc.prepared))
			} else {
				m, err = r.Restore(ctx, tc.snap, runner.RestoreOptions{})
			}
			if err != nil {
				t.Fatal(err)
			}
			defer m.Stop(ctx)
			km := m.(*Machine)
			if !tc.boot {
				slot := false
				for _, ph := range km.phases {
					slot = slot || ph.Name == "memslot"
				}
				if slot == tc.takes {
					t.Fatalf("restore phases %+v: prepared VM taken %v, want %v", km.phases, !slot, tc.takes)
				}
			}
			if _, err := km.Report(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}
