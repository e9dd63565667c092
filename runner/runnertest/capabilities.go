package runnertest

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// forkSnapshot is m's SnapshotForFork where it is a runner.Forker, else
// its Snapshot.
func forkSnapshot(m runner.Machine) func(context.Context, string, runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	if f, ok := m.(runner.Forker); ok {
		return f.SnapshotForFork
	}
	return m.Snapshot
}

// flush waits for r's background writes, where it has them.
func flush(t *testing.T, r runner.Runner) {
	t.Helper()
	if bw, ok := r.(runner.BackgroundWriter); ok {
		if err := bw.Flush(ctx(t)); err != nil {
			t.Fatalf("Flush: %v", err)
		}
	}
}

// skipWithout skips a check of capability name, saying that the backend
// lacks it.
func skipWithout(t *testing.T, r runner.Runner, name string) {
	t.Helper()
	t.Skipf("the %s backend does not have runner.%s", r.Name(), name)
}

// checkCapabilities checks, one subtest each, the capabilities a machine
// of b.Spec may have, on one machine that they share (a boot is what takes
// time): each subtest takes snapshots of its own names.
func checkCapabilities(t *testing.T, b Backend) {
	r, g := b.New(t)
	spec := b.Spec
	var disk *testDisk
	if df, ok := r.(runner.DiskFiles); ok {
		disk = newTestDisk(t, g, df)
		spec.Disk = &runner.Disk{Path: disk.top, Base: testDiskBase}
	}
	m := start(t, r, spec)
	next(t, b, m)
	for _, c := range []struct {
		name string
		fn   func(t *testing.T, b Backend, r runner.Runner, g *snapshotter.Graph, m runner.Machine)
	}{
		// First: its checks expect the machine's first snapshot.
		{"DiskFiles", func(t *testing.T, b Backend, r runner.Runner, _ *snapshotter.Graph, m runner.Machine) {
			if disk == nil {
				skipWithout(t, r, "DiskFiles")
			}
			checkDiskFiles(t, b, r, m, disk)
		}},
		{"AgentHost", checkAgentHost},
		{"CPUMeter", checkCPUMeter},
		{"MemoryMeter", checkMemoryMeter},
		{"SpecReader", checkSpecReader},
		{"Forker", checkForker},
		{"BackgroundWriter", checkBackgroundWriter},
		{"SnapshotReleaser", checkSnapshotReleaser},
	} {
		t.Run(c.name, func(t *testing.T) { c.fn(t, b, r, g, m) })
	}
}

// The agent's socket exists and takes connections while the machine runs.
func checkAgentHost(t *testing.T, b Backend, r runner.Runner, _ *snapshotter.Graph, m runner.Machine) {
	ah, ok := m.(runner.AgentHost)
	if !ok {
		skipWithout(t, r, "AgentHost")
	}
	next(t, b, m)
	fi, err := os.Stat(ah.AgentSocket())
	if err != nil || fi.Mode().Type() != os.ModeSocket {
		t.Fatalf("agent socket %s: %v (mode %v), want a unix socket", ah.AgentSocket(), err, fi)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx(t), "unix", ah.AgentSocket())
	if err != nil {
		t.Fatalf("connecting to the agent socket: %v", err)
	}
	_ = conn.Close()
}

// CPU time grows while the guest runs and is an error once it stopped.
func checkCPUMeter(t *testing.T, b Backend, r runner.Runner, _ *snapshotter.Graph, m runner.Machine) {
	cm, ok := m.(runner.CPUMeter)
	if !ok {
		skipWithout(t, r, "CPUMeter")
	}
	t1, err := cm.CPUTime()
	if err != nil {
		t.Fatalf("CPUTime: %v", err)
	}
	next(t, b, m)
	next(t, b, m)
	t2, err := cm.CPUTime()
	if err != nil {
		t.Fatalf("CPUTime: %v", err)
	}
	if t2 <= 0 || t2 < t1 {
		t.Fatalf("CPU time %v then %v: want positive and growing", t1, t2)
	}
	// A stopped machine's: a restore of m, stopped.
	if _, err := m.Snapshot(ctx(t), "cpu", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	c := restore(t, r, "cpu", runner.RestoreOptions{})
	if err := c.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.(runner.CPUMeter).CPUTime(); err == nil {
		t.Fatal("CPUTime of a stopped machine succeeded")
	}
}

// A running machine holds some memory, PSS no more than RSS, and its
// memory is an error once it stopped.
func checkMemoryMeter(t *testing.T, b Backend, r runner.Runner, _ *snapshotter.Graph, m runner.Machine) {
	mm, ok := m.(runner.MemoryMeter)
	if !ok {
		skipWithout(t, r, "MemoryMeter")
	}
	next(t, b, m)
	u, err := mm.Memory()
	if err != nil {
		t.Fatalf("Memory: %v", err)
	}
	if u.RSS <= 0 || u.PSS <= 0 || u.PSS > u.RSS {
		t.Fatalf("Memory of a running machine: %+v, want RSS and PSS positive, PSS no more than RSS", u)
	}
	// A stopped machine's: a restore of m, stopped.
	if _, err := m.Snapshot(ctx(t), "mem", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	c := restore(t, r, "mem", runner.RestoreOptions{})
	if _, err := c.(runner.MemoryMeter).Memory(); err != nil {
		t.Fatalf("Memory of a restored machine: %v", err)
	}
	if err := c.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if u, err := c.(runner.MemoryMeter).Memory(); err == nil {
		t.Fatalf("Memory of a stopped machine: %+v, no error", u)
	}
}

// testDiskBase names the snapshot a test disk starts from.
const testDiskBase = "disk-base"

// testDisk is a disk made with DiskFiles.CreateDisk over a raw base that
// is also in the store.
type testDisk struct {
	df        runner.DiskFiles
	dir       string
	base, top string
}

// newTestDisk makes a disk over a 1 MiB raw base and checks that it
// stands on it, and that the backend claims no stranger file.
func newTestDisk(t *testing.T, g *snapshotter.Graph, df runner.DiskFiles) *testDisk {
	d := &testDisk{df: df, dir: t.TempDir()}
	d.base = filepath.Join(d.dir, "base.raw")
	content := bytes.Repeat([]byte("boxd-disk-base!\n"), 1<<16)
	if err := os.WriteFile(d.base, content, 0o444); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Ingest(ctx(t), bytes.NewReader(content), snapshotter.IngestOptions{Name: testDiskBase}); err != nil {
		t.Fatal(err)
	}
	d.top = filepath.Join(d.dir, "top.disk")
	if err := df.CreateDisk(ctx(t), d.top, d.base); err != nil {
		t.Fatalf("CreateDisk: %v", err)
	}
	if chain := df.DiskChain(d.top); !slices.Equal(chain, []string{d.top, d.base}) {
		t.Fatalf("DiskChain of a new disk: %v, want [%s %s]", chain, d.top, d.base)
	}
	if got := df.DiskOrigin(filepath.Join(d.dir, "stranger.disk")); got != "" {
		t.Fatalf("DiskOrigin of a file the backend did not make: %q, want none", got)
	}
	return d
}

// A snapshot of m, which runs on disk d, freezes a layer that stands on
// d's base and names d as its origin; m goes on on a new top, and a
// restore's disk stands on the layer.
func checkDiskFiles(t *testing.T, b Backend, r runner.Runner, m runner.Machine, d *testDisk) {
	df, base, top, dir := d.df, d.base, d.top, d.dir
	s, err := m.Snapshot(ctx(t), "d1", runner.SnapshotOptions{})
	if err != nil {
		t.Fatalf("Snapshot of a machine with a disk: %v", err)
	}
	frozen := df.SnapshotDisk(s)
	if frozen == "" {
		t.Fatal("SnapshotDisk of the snapshot: none")
	}
	if chain := df.DiskChain(frozen); chain[len(chain)-1] != base {
		t.Fatalf("DiskChain of the snapshot's disk: %v, want it to end at %s", chain, base)
	}
	// Every layer the backend makes of the disk names it as its origin.
	if frozen != top {
		if got := df.DiskOrigin(frozen); got != top {
			t.Fatalf("DiskOrigin of the layer %s: %q, want %s", frozen, got, top)
		}
	}
	if dm, ok := m.(runner.DiskMachine); ok {
		now := dm.Disk()
		if chain := df.DiskChain(now); !slices.Contains(chain, frozen) || chain[len(chain)-1] != base {
			t.Fatalf("the machine's disk after the snapshot, %s, has chain %v: want it over %s and %s", now, chain, frozen, base)
		}
		if now != top {
			if got := df.DiskOrigin(now); got != top {
				t.Fatalf("DiskOrigin of the machine's new layer %s: %q, want %s", now, got, top)
			}
		}
	}
	next(t, b, m)
	s2, err := m.Snapshot(ctx(t), "d2", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatalf("second snapshot of a machine with a disk: %v", err)
	}
	if f2 := df.SnapshotDisk(s2); f2 != top && df.DiskOrigin(f2) != top {
		t.Fatalf("DiskOrigin of the second snapshot's layer %s: %q, want %s", f2, df.DiskOrigin(f2), top)
	}
	next(t, b, m) // it runs on
	rdisk := filepath.Join(dir, "restored.disk")
	c := restore(t, r, "d1", runner.RestoreOptions{Disk: rdisk})
	next(t, b, c)
	if chain := df.DiskChain(rdisk); len(chain) < 2 || chain[0] != rdisk {
		t.Fatalf("DiskChain of a restore's disk: %v, want it to start at %s and stand on the snapshot's disk", chain, rdisk)
	}
}

// A fork snapshot's restores start (on spares) and diverge; the machine
// runs on; the snapshot restores again once in the store.
func checkForker(t *testing.T, b Backend, r runner.Runner, g *snapshotter.Graph, m runner.Machine) {
	f, ok := m.(runner.Forker)
	if !ok {
		skipWithout(t, r, "Forker")
	}
	next(t, b, m)
	if err := f.StartSpares(ctx(t), 2); err != nil {
		t.Fatalf("StartSpares: %v", err)
	}
	if _, err := f.SnapshotForFork(ctx(t), "f", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatalf("SnapshotForFork: %v", err)
	}
	o1 := next(t, b, m)
	a := restore(t, r, "f", runner.RestoreOptions{Unique: true})
	c := restore(t, r, "f", runner.RestoreOptions{Unique: true})
	oa, oc := divergence(t, b, a, c)
	if oa.Checksum == oc.Checksum {
		t.Fatalf("two unique forks have the same memory after running: %+v", oa)
	}
	if o2 := next(t, b, m); o2.Counter <= o1.Counter {
		t.Fatal("the machine stopped running after SnapshotForFork")
	}
	flush(t, r)
	if _, err := g.Get("f"); err != nil {
		t.Fatalf("the fork's snapshot is not in the store after Flush: %v", err)
	}
	// A fork of a fork.
	if cf, ok := a.(runner.Forker); ok {
		if _, err := cf.SnapshotForFork(ctx(t), "ff", runner.SnapshotOptions{Incremental: true}); err != nil {
			t.Fatalf("SnapshotForFork of a fork: %v", err)
		}
		next(t, b, restore(t, r, "ff", runner.RestoreOptions{Unique: true}))
	}
	// As the box manager does once a fork's children run.
	flush(t, r)
	if rel, ok := r.(runner.SnapshotReleaser); ok {
		rel.ReleaseSnapshot("f")
		rel.ReleaseSnapshot("ff")
	}
}

// Flush puts every snapshot taken in the store and leaves none pending.
func checkBackgroundWriter(t *testing.T, b Backend, r runner.Runner, g *snapshotter.Graph, m runner.Machine) {
	bw, ok := r.(runner.BackgroundWriter)
	if !ok {
		skipWithout(t, r, "BackgroundWriter")
	}
	next(t, b, m)
	snap := forkSnapshot(m) // the kind that writes in the background
	if _, err := snap(ctx(t), "b1", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	next(t, b, m)
	if _, err := snap(ctx(t), "b2", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	if p := bw.Pending(); len(p) > 0 && !slices.Contains(p, "b2") {
		t.Fatalf("Pending %v lists snapshots but not the newest, b2", p)
	}
	if err := bw.Flush(ctx(t)); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if p := bw.Pending(); len(p) != 0 {
		t.Fatalf("Pending after Flush: %v, want none", p)
	}
	if rel, ok := r.(runner.SnapshotReleaser); ok { // no restores are due
		rel.ReleaseSnapshot("b1")
		rel.ReleaseSnapshot("b2")
	}
	for _, n := range []string{"b1", "b2"} {
		s, err := g.Get(n)
		if err != nil {
			t.Fatalf("snapshot %s after Flush: %v", n, err)
		}
		if n == "b2" && s.Parent != "b1" {
			t.Fatalf("b2's parent %q, want b1", s.Parent)
		}
	}
}

// A released snapshot restores again, from the store.
func checkSnapshotReleaser(t *testing.T, b Backend, r runner.Runner, _ *snapshotter.Graph, m runner.Machine) {
	rel, ok := r.(runner.SnapshotReleaser)
	if !ok {
		skipWithout(t, r, "SnapshotReleaser")
	}
	next(t, b, m)
	if f, ok := m.(runner.Forker); ok {
		if err := f.StartSpares(ctx(t), 1); err != nil {
			t.Fatal(err)
		}
	}
	snap := forkSnapshot(m)
	if _, err := snap(ctx(t), "r1", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	c := restore(t, r, "r1", runner.RestoreOptions{})
	next(t, b, c)
	flush(t, r)
	rel.ReleaseSnapshot("r1") // c still uses it
	next(t, b, c)
	if err := c.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	rel.ReleaseSnapshot("r1")
	next(t, b, restore(t, r, "r1", runner.RestoreOptions{}))
	rel.ReleaseSnapshot("no-such-snapshot") // nothing to release
}

// A snapshot says what machine it restores as; another backend's does not.
func checkSpecReader(t *testing.T, b Backend, r runner.Runner, g *snapshotter.Graph, m runner.Machine) {
	sr, ok := r.(runner.SpecReader)
	if !ok {
		skipWithout(t, r, "SpecReader")
	}
	next(t, b, m)
	if _, err := m.Snapshot(ctx(t), "sp", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	flush(t, r)
	s, err := g.Get("sp")
	if err != nil {
		t.Fatal(err)
	}
	got, err := sr.SnapshotSpec(s)
	if err != nil {
		t.Fatalf("SnapshotSpec: %v", err)
	}
	want := b.Spec
	if got.MemSize != want.MemSize || max(got.CPUs, 1) != max(want.CPUs, 1) || got.Kernel != want.Kernel ||
		got.Initrd != want.Initrd || got.Cmdline != want.Cmdline {
		t.Fatalf("SnapshotSpec: %+v, want the machine's %+v", got, want)
	}
	other := snapshotter.Snapshot{Name: "other", Labels: map[string]string{runner.LabelRunner: r.Name() + "-other"}}
	if _, err := sr.SnapshotSpec(other); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("SnapshotSpec of another backend's snapshot: %v, want ErrInvalidArgument", err)
	}
}

// A runner after the one that started a machine adopts it: the machine
// goes on, snapshots as a delta of its previous snapshot (which its
// restore takes the same next step from), and stops. An unknown machine
// is errdefs.ErrNotFound.
func checkAdopter(t *testing.T, b Backend) {
	r, _ := b.New(t)
	if _, ok := r.(runner.Adopter); !ok {
		skipWithout(t, r, "Adopter")
	}
	if b.Successor == nil {
		t.Skip("the suite was given no Successor for the Adopter check")
	}
	m := start(t, r, b.Spec)
	next(t, b, m)
	if _, err := m.Snapshot(ctx(t), "before", runner.SnapshotOptions{}); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	r2 := b.Successor(t, r, m)
	am, err := r2.(runner.Adopter).Adopt(ctx(t), m.ID())
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	t.Cleanup(func() { _ = am.Stop(context.Background()) })
	if am.ID() != m.ID() {
		t.Errorf("adopted machine's ID %q, want %q", am.ID(), m.ID())
	}
	next(t, b, am)
	if err := am.Pause(ctx(t)); err != nil {
		t.Fatalf("Pause of the adopted machine: %v", err)
	}
	s, err := am.Snapshot(ctx(t), "adopted", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatalf("Snapshot of the adopted machine: %v", err)
	}
	if s.Parent != "before" {
		t.Errorf("the adopted machine's snapshot has parent %q, want its previous snapshot", s.Parent)
	}
	c := restore(t, r2, "adopted", runner.RestoreOptions{Paused: true})
	if want, got := next(t, b, am), next(t, b, c); got != want {
		t.Fatalf("restored machine's next step %+v, the adopted one's %+v", got, want)
	}
	if _, err := r2.(runner.Adopter).Adopt(ctx(t), "no-such-machine"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Adopt of an unknown machine = %v, want errdefs.ErrNotFound", err)
	}
	if err := am.Stop(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(am.Err(), runner.ErrStopped) {
		t.Errorf("Err after Stop = %v, want runner.ErrStopped", am.Err())
	}
}
