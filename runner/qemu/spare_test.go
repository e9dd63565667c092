package qemu_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// diskInit prints a growing counter and the first bytes of /dev/vda, read
// from the device each time (the page cache dropped), every 200 ms.
const diskInit = `#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/boxd/order); do insmod /lib/modules/boxd/$m; done
i=0
while :; do
	echo 3 > /proc/sys/vm/drop_caches
	echo "step $i disk $(head -c 10 /dev/vda)"
	i=$((i+1))
	sleep 0.2
done
`

var diskStepRE = regexp.MustCompile(`(?m)^step (\d+) disk (\S*)\r?\n`)

// diskStep waits for a console line of diskInit numbered after after and
// returns its number and what it read from the disk.
func diskStep(ctx context.Context, t testing.TB, m *qemu.Machine, after int) (int, string) {
	t.Helper()
	for {
		for _, s := range diskStepRE.FindAllSubmatch(m.Console(), -1) {
			if n, _ := strconv.Atoi(string(s[1])); n > after {
				return n, string(s[2])
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: no step after %d: %v; console:\n%s", m.ID(), after, ctx.Err(), m.Console())
		case <-m.Done():
			t.Fatalf("%s exited: %v; console:\n%s", m.ID(), m.Err(), m.Console())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestWarmFork forks a machine onto spares started before the fork: the
// machine goes on, each fork carries on from the snapshot's memory with
// its own disk and console, spares left over go with the frozen file, and
// spares of a machine that stops stop with it.
func TestWarmFork(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, g, spec, work := diskMachine(ctx, t)
	parent, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = parent.Stop(context.Background()) })
	before, got := diskStep(ctx, t, parent, 2)
	if got != "boxd-disk!" {
		t.Fatalf("the parent reads %q from its disk, want boxd-disk!", got)
	}
	if err := parent.StartSpares(ctx, 2); err != nil {
		t.Fatalf("Warm: %v", err)
	}
	if n := parent.Spares(); n != 2 {
		t.Fatalf("Spares = %d after Warm(2)", n)
	}
	// Let it run on a while after the spares started.
	before, _ = diskStep(ctx, t, parent, before+3)

	// The snapshot holds this step or a later one: a fork's console
	// starts after it. (The parent's console read after the fork may hold
	// steps it printed once it went on, which its forks print too.)
	beforeFork := lastStep(parent.Console())
	start := time.Now()
	// The snapshot's write waits for hold, never closed here: until something needs it in the store.
	hold := make(chan struct{})
	qemu.SetMaxWriteHold(t, 5*time.Minute)
	if _, err := parent.SnapshotForFork(ctx, "warm-fork", runner.SnapshotOptions{WriteAfter: hold}); err != nil {
		t.Fatalf("Fork: %v", err)
	}
	t.Logf("fork: %v", time.Since(start))
	frozeAt := lastStep(parent.Console())
	if frozeAt < before {
		t.Fatalf("the parent's console ends at step %d, before %d", frozeAt, before)
	}
	var kids []*qemu.Machine
	for i := range 3 {
		console := filepath.Join(work, "console-"+strconv.Itoa(i))
		k, err := r.RestoreMachine(ctx, "warm-fork", runner.RestoreOptions{
			Disk: filepath.Join(work, "kid-"+strconv.Itoa(i)+".qcow2"), Console: console,
		})
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		t.Cleanup(func() { _ = k.Stop(context.Background()) })
		kids = append(kids, k)
		if i == 1 {
			t.Logf("freeze and two restores on spares: %v", time.Since(start))
			if n := parent.Spares(); n != 0 {
				t.Fatalf("%d spares left after two restores, want 0", n)
			}
		}
	}
	// The forks carry on without the kernel in QEMU's memory: they start on its stub.
	if got := kernelArg(t, parent.PID()); got != spec.Kernel {
		t.Errorf("the parent booted %s, want %s", got, spec.Kernel)
	}
	for i, k := range kids {
		stub := kernelArg(t, k.PID())
		if st, err := os.Stat(stub); err != nil || stub == spec.Kernel || st.Size() > 64<<10 {
			t.Errorf("fork %d started on kernel %s (%v), want a stub of at most 64 KiB", i, stub, err)
		}
	}
	for i, k := range kids {
		n, got := diskStep(ctx, t, k, frozeAt)
		if got != "boxd-disk!" {
			t.Errorf("fork %d reads %q from its disk, want boxd-disk!; console:\n%s", i, got, k.Console())
		}
		if n > frozeAt+10 {
			t.Errorf("fork %d went on at step %d, the parent froze at %d: it did not carry on", i, n, frozeAt)
		}
		if first := firstStep(k.Console()); first <= beforeFork && i < 2 {
			// The console a spare writes is the restore's own file.
			t.Errorf("fork %d's console starts at step %d, the parent had printed step %d before the fork", i, first, beforeFork)
		}
		c, err := os.ReadFile(filepath.Join(work, "console-"+strconv.Itoa(i)))
		if err != nil || !diskStepRE.Match(c) {
			t.Errorf("fork %d's console file: %v, %q", i, err, c)
		}
	}
	// The parent goes on.
	if n, got := diskStep(ctx, t, parent, frozeAt+2); got != "boxd-disk!" {
		t.Fatalf("the parent after the fork: step %d reading %q", n, got)
	}
	// Fork returned before its snapshot was in the store, whose write its WriteAfter holds back; Committed
	// writes it at once, and a fork's own snapshot builds on it.
	if !slices.Contains(r.Pending(), "warm-fork") {
		t.Fatalf("warm-fork was written while its WriteAfter held it back: pending %v", r.Pending())
	}
	cctx, ccancel := context.WithTimeout(ctx, time.Minute)
	defer ccancel()
	snap, err := r.Committed(cctx, "warm-fork")
	if err != nil {
		t.Fatalf("Committed: %v", err)
	}
	if _, ok := snap.Map("memory"); !ok {
		t.Fatalf("snapshot warm-fork has no memory map: %+v", snap)
	}
	if _, err := kids[0].Snapshot(ctx, "warm-kid", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatalf("snapshot of a fork: %v", err)
	}
	if s, err := g.Get("warm-kid"); err != nil || s.Parent != "warm-fork" {
		t.Fatalf("warm-kid: %+v, %v; want a child of warm-fork", s, err)
	}
	for _, k := range kids {
		_ = k.Stop(ctx)
	}
	if left := r.FrozenFiles(); len(left) != 0 {
		t.Errorf("frozen files left after every fork stopped: %v", left)
	}
	_ = parent.Stop(ctx)

	// Spares of a machine that stops stop too.
	other, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := other.StartSpares(ctx, 1); err != nil {
		t.Fatal(err)
	}
	_ = other.Stop(ctx)
	for other.Spares() != 0 {
		select {
		case <-ctx.Done():
			t.Fatalf("the spare outlived its machine")
		case <-time.After(20 * time.Millisecond):
		}
	}
	// Every memory file goes: frozen, prepared, and the machines' own.
	if left := memFiles(t, r.MemDir); len(left) != 0 {
		time.Sleep(2 * time.Second) // spares stopped in the background
		if left = memFiles(t, r.MemDir); len(left) != 0 {
			t.Errorf("memory files left: %v", left)
		}
	}
	// Every machine's folder goes when its QEMU ends (disks/ and
	// kernel-stubs/ are the runner's: disks exported from the store, the
	// kernels restores start on).
	if left := machineDirs(t, r.Dir); len(left) != 0 {
		time.Sleep(time.Second)
		if left = machineDirs(t, r.Dir); len(left) != 0 {
			t.Errorf("machine folders left: %v", left)
		}
	}
}

func memFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func machineDirs(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if e.Name() != "disks" && e.Name() != "kernel-stubs" { // the runner's own
			out = append(out, e.Name())
		}
	}
	return out
}

// frozenMachine starts a machine of spec, lets it run a few steps and
// freezes it as snapshot name; it returns the step the console ends at.
func frozenMachine(ctx context.Context, t *testing.T, r *qemu.Runner, spec runner.Spec, name string) int {
	t.Helper()
	m, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	diskStep(ctx, t, m, 2)
	if _, err := m.Freeze(ctx, name, runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	return lastStep(m.Console())
}

// diskMachine returns a runner and the spec of a machine running diskInit
// on a qcow2 overlay over an image in the runner's store, as a box is.
func diskMachine(ctx context.Context, t testing.TB) (*qemu.Runner, *snapshotter.Graph, runner.Spec, string) {
	t.Helper()
	return diskMachineWith(ctx, t, diskInit)
}

// diskMachineWith is diskMachine with init as the guest's /init.
func diskMachineWith(ctx context.Context, t testing.TB, init string) (*qemu.Runner, *snapshotter.Graph, runner.Spec, string) {
	t.Helper()
	kernel, initrd := busyboxGuest(ctx, t, init, "virtio_pci", "virtio_blk")
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	r := &qemu.Runner{Dir: t.TempDir(), MemDir: shmDir(t), Graph: g, Logger: testLogger(t)}
	work := t.TempDir()
	disk := filepath.Join(work, "disk.raw")
	content := make([]byte, 1<<20)
	copy(content, "boxd-disk!")
	if err := os.WriteFile(disk, content, 0o444); err != nil {
		t.Fatal(err)
	}
	// The disk is an image in the store with a qcow2 overlay over it, as a
	// box's is: a freeze then writes the snapshot after it returns.
	if _, err := g.Ingest(ctx, bytes.NewReader(content), snapshotter.IngestOptions{Name: "warm-image"}); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(work, "parent.qcow2")
	if err := qemu.CreateOverlay(ctx, overlay, disk); err != nil {
		t.Fatal(err)
	}
	spec := runner.Spec{
		MemSize: 128 << 20,
		Kernel:  kernel,
		Initrd:  initrd,
		Cmdline: "console=ttyS0 panic=-1 quiet",
		Network: runner.NetworkNone,
		Disk:    &runner.Disk{Path: overlay, Base: "warm-image"},
	}
	return r, g, spec, work
}

// testLogger logs at debug level to the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func lastStep(console []byte) int { return lastNumbered(diskStepRE, console) }

// lastNumbered is the largest number re's first group matches in console,
// -1 for none.
func lastNumbered(re *regexp.Regexp, console []byte) int {
	last := -1
	for _, s := range re.FindAllSubmatch(console, -1) {
		if n, _ := strconv.Atoi(string(s[1])); n > last {
			last = n
		}
	}
	return last
}

func firstStep(console []byte) int {
	if s := diskStepRE.FindSubmatch(console); s != nil {
		n, _ := strconv.Atoi(string(s[1]))
		return n
	}
	return -1
}

// TestOwnMemory restores machines onto memory files of their own: copied
// from a frozen file, and rebuilt from the store. Such a machine carries
// on, has spares, and its own freeze goes to the store after it returns;
// its first snapshot stores only what the guest changed.
func TestOwnMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, g, spec, work := diskMachine(ctx, t)
	frozeAt := frozenMachine(ctx, t, r, spec, "own-1")

	restore := func(snap, name string) *qemu.Machine {
		t.Helper()
		m, err := r.RestoreMachine(ctx, snap, runner.RestoreOptions{
			Disk: filepath.Join(work, name+".qcow2"), LongLived: true,
		})
		if err != nil {
			t.Fatalf("restore of %s with its own memory: %v", snap, err)
		}
		t.Cleanup(func() { _ = m.Stop(context.Background()) })
		return m
	}
	// From the frozen file, while the snapshot may still be on its way.
	a := restore("own-1", "a")
	if slices.Contains(r.FrozenFiles(), a.MemoryFile()) {
		t.Fatal("a restore with its own memory maps the frozen file")
	}
	if n, got := diskStep(ctx, t, a, frozeAt); got != "boxd-disk!" || n > frozeAt+10 {
		t.Fatalf("own restore: step %d reading %q; the parent froze at %d", n, got, frozeAt)
	}
	// The frozen file goes once its snapshot is in the store: nothing maps
	// it, and nothing is to (ReleaseSnapshot, as a fork says once its forks run).
	r.ReleaseSnapshot("own-1")
	if _, err := r.Committed(ctx, "own-1"); err != nil {
		t.Fatal(err)
	}
	if left := r.FrozenFiles(); len(left) != 0 {
		t.Errorf("the frozen file stays after its only restore copied it and its snapshot is stored: %v", left)
	}
	// Its first snapshot is a small delta: its page sums were taken at the
	// restore.
	s, err := a.Snapshot(ctx, "own-2", runner.SnapshotOptions{Incremental: true})
	if err != nil {
		t.Fatal(err)
	}
	mem, _ := s.Map("memory")
	full, _ := func() (snapshotter.MapInfo, bool) { s, _ := g.Get("own-1"); return s.Map("memory") }()
	t.Logf("own-1 stored %d memory bytes; own-2, after the restore, %d", full.NewStored, mem.NewStored)
	if mem.NewStored*4 > full.NewStored {
		t.Errorf("the first snapshot after an own restore stored %d bytes of memory, the full one %d: the guest cannot have changed that much", mem.NewStored, full.NewStored)
	}
	// It has spares, and its freeze forks onto them.
	if err := a.StartSpares(ctx, 1); err != nil {
		t.Fatalf("Warm of a machine with its own memory: %v", err)
	}
	before, _ := diskStep(ctx, t, a, 0)
	if _, err := a.SnapshotForFork(ctx, "own-3", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	b, err := r.RestoreMachine(ctx, "own-3", runner.RestoreOptions{Disk: filepath.Join(work, "b.qcow2")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Stop(context.Background()) })
	if a.Spares() != 0 {
		t.Error("the restore did not take the spare")
	}
	if n, got := diskStep(ctx, t, b, before); got != "boxd-disk!" {
		t.Fatalf("fork of an own restore: step %d reading %q", n, got)
	}
	// Rebuilt from the store, once the frozen file is gone.
	_ = b.Stop(ctx)
	_ = a.Stop(ctx)
	if _, err := r.Committed(ctx, "own-3"); err != nil {
		t.Fatal(err)
	}
	if left := r.FrozenFiles(); len(left) != 0 {
		t.Fatalf("frozen files left: %v", left)
	}
	c := restore("own-3", "c")
	if n, got := diskStep(ctx, t, c, before); got != "boxd-disk!" {
		t.Fatalf("own restore from the store: step %d reading %q", n, got)
	}
}

// TestWarmForkOfFork forks a fork, which maps its parent's frozen file
// copy-on-write, onto spares: Warm copies the frozen file, Fork adds the
// fork's own pages to the copy, the restores take the spares, and the fork
// goes on.
func TestWarmForkOfFork(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, g, spec, work := diskMachine(ctx, t)
	r.LiveForks = true
	frozenMachine(ctx, t, r, spec, "fof-1")
	fork, err := r.RestoreMachine(ctx, "fof-1", runner.RestoreOptions{Disk: filepath.Join(work, "fork.qcow2")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fork.Stop(context.Background()) })
	if err := fork.StartSpares(ctx, 2); err != nil {
		t.Fatalf("Warm of a fork: %v", err)
	}
	if n := fork.Spares(); n != 2 {
		t.Fatalf("Spares = %d after Warm(2) of a fork", n)
	}
	// The fork runs on, writing pages of its own, then freezes.
	before, _ := diskStep(ctx, t, fork, 0)
	before, _ = diskStep(ctx, t, fork, before+3)
	frozenBefore := allocated(t, fork.MemoryFile())
	start := time.Now()
	if _, err := fork.SnapshotForFork(ctx, "fof-2", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	// Live where QEMU's dirty tracking is sound (not QEMU 7.2 under TCG);
	// else as files, where the device-state save reads every page the same.
	if n, want := qemu.LiveForks(fork), map[bool]int64{true: 1}[qemu.LiveTracked(fork)]; n != want {
		t.Errorf("%d live copies of the fork's memory, want %d", n, want)
	}
	// The copy read every page of the frozen file the fork maps, which
	// fills its holes: they go back to holes.
	awaitAllocated(t, fork.MemoryFile(), frozenBefore+4<<20, start)
	frozeAt := lastStep(fork.Console())
	var kids []*qemu.Machine
	for i := range 2 {
		k, err := r.RestoreMachine(ctx, "fof-2", runner.RestoreOptions{Disk: filepath.Join(work, fmt.Sprintf("kid-%d.qcow2", i))})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = k.Stop(context.Background()) })
		kids = append(kids, k)
	}
	t.Logf("fork of a fork and two restores: %v", time.Since(start))
	if fork.Spares() != 0 {
		t.Error("the restores did not take the spares")
	}
	if n, _ := diskStep(ctx, t, fork, frozeAt+2); n <= frozeAt {
		t.Fatal("the fork did not go on")
	}
	for i, k := range kids {
		n, got := diskStep(ctx, t, k, frozeAt)
		if got != "boxd-disk!" || n > frozeAt+10 {
			t.Fatalf("fork %d of the fork: step %d reading %q; it froze at %d", i, n, got, frozeAt)
		}
	}
	// Spares a fork did not take go with ReleaseSnapshot.
	if err := fork.StartSpares(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := fork.SnapshotForFork(ctx, "fof-3", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	if n := fork.Spares(); n != 1 {
		t.Fatalf("Spares = %d after a fork nobody restored, want 1", n)
	}
	r.ReleaseSnapshot("fof-3")
	if n := fork.Spares(); n != 0 {
		t.Fatalf("Spares = %d after ReleaseSnapshot", n)
	}
	if _, err := r.Committed(ctx, "fof-3"); err != nil {
		t.Fatal(err)
	}
	// A plain snapshot's device state carries the fork's private RAM, read
	// through the frozen file too: its holes go back as well.
	frozenBefore = allocated(t, fork.MemoryFile())
	start = time.Now()
	if _, err := fork.Snapshot(ctx, "fof-4", runner.SnapshotOptions{Incremental: true}); err != nil {
		t.Fatal(err)
	}
	awaitAllocated(t, fork.MemoryFile(), frozenBefore+4<<20, start)
	// The snapshot in the store is whole: a restore from it, with the
	// frozen files gone, carries on too.
	if _, err := r.Committed(ctx, "fof-2"); err != nil {
		t.Fatal(err)
	}
	for _, k := range kids {
		_ = k.Stop(ctx)
	}
	_ = fork.Stop(ctx)
	if left := r.FrozenFiles(); len(left) != 0 {
		t.Fatalf("frozen files left: %v", left)
	}
	if _, err := g.Get("fof-2"); err != nil {
		t.Fatal(err)
	}
	c, err := r.RestoreMachine(ctx, "fof-2", runner.RestoreOptions{Disk: filepath.Join(work, "c.qcow2")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Stop(context.Background()) })
	if n, got := diskStep(ctx, t, c, frozeAt); got != "boxd-disk!" || n > frozeAt+10 {
		t.Fatalf("restore from the store: step %d reading %q; the fork froze at %d", n, got, frozeAt)
	}
	_ = before
}

// allocated is how many bytes of the file at path are allocated.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// awaitAllocated waits until at most limit bytes of the file at path are
// allocated, for 20 s after start.
func awaitAllocated(t *testing.T, path string, limit int64, start time.Time) {
	t.Helper()
	for n := allocated(t, path); n > limit; n = allocated(t, path) {
		if time.Since(start) > 20*time.Second {
			t.Fatalf("%s holds %d bytes, want at most %d", path, n, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kernelArg is the -kernel argument of QEMU process pid.
func kernelArg(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(string(b), "\x00")
	if i := slices.Index(args, "-kernel"); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	t.Fatalf("QEMU %d has no -kernel", pid)
	return ""
}

// TestStopResumeSparesDuringRefill stops resume spares while a refill
// starts one: once StopResumeSpares returns, no spare and no memory file is
// left, as a daemon that exits then must leave none.
func TestStopResumeSparesDuringRefill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	r, _, spec, _ := diskMachine(ctx, t)
	r.ResumeSpares = 1
	for _, wait := range []time.Duration{0, 20 * time.Millisecond, 80 * time.Millisecond} {
		r2 := &qemu.Runner{Dir: r.Dir, MemDir: r.MemDir, Graph: r.Graph, ResumeSpares: 1}
		r2.RefillResumeSpares(spec)
		time.Sleep(wait)
		r2.StopResumeSpares()
		if n := r2.WaitingResumeSpares(); n != 0 {
			t.Errorf("stopped %v after a refill began: %d spares wait", wait, n)
		}
		if left := memFiles(t, r.MemDir); len(left) != 0 {
			t.Errorf("stopped %v after a refill began: memory files left: %v", wait, left)
		}
	}
}
