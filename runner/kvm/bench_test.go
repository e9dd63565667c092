package kvm

// Speed benchmarks of the kvm runner: fork, hibernate, resume and the
// re-touch of a working set after a lazy restore, with QEMU's fork recipe
// measured beside fork in the same run. They run only under go test -bench
// (bench/kvm.sh runs them); plain go test runs only TestBenchInstruments, a
// quick check of the guest command and VMM request they rely on.
//
// Every figure is taken from CLOCK_MONOTONIC, which the VMM processes share
// with this one: the end of a restore is the moment the restored vCPU first
// left KVM_RUN (the VMM notes it), not the moment this process heard of it.
// Each benchmark reports percentiles over its iterations in milliseconds and
// hides ns/op, which would count the untimed work between iterations (the
// guest dirtying memory, stopping children).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/kvm/guest"
	"github.com/boxd-dev/boxd/snapshotter"
)

const mib = 1 << 20

// benchRunner is a runner whose store lives in a fresh folder under the
// test's temporary directory (a disk, as a box's store would be), and which
// notes when Restore and Snapshot finish each step. Its VMM processes are
// `$BOXD_BENCH_VMM vmm` when that names a boxd binary (bench/kvm.sh builds
// one: the VMM as boxd runs it, whose start-up is part of every restore),
// otherwise this test binary.
func benchRunner(b *testing.B) (*Runner, *steps) {
	b.Helper()
	requireKVM(b)
	g := testutil.OpenGraph(b, b.TempDir(), snapshotter.Open)
	st := &steps{at: map[string]time.Duration{}}
	r := &Runner{Graph: g, Command: []string{os.Args[0]}, Env: []string{"BOXD_TEST_VMM=1"}, Dir: b.TempDir(), step: st.note}
	if vmm := os.Getenv("BOXD_BENCH_VMM"); vmm != "" {
		r.Command, r.Env = []string{vmm, "vmm"}, nil
	}
	return r, st
}

// steps holds when each step of the latest Restore or Snapshot ended
// (CLOCK_MONOTONIC). Only the benchmark's goroutine calls Restore and
// Snapshot, so it needs no lock.
type steps struct{ at map[string]time.Duration }

func (s *steps) note(name string) { s.at[name] = monotonic() }

// benchSpec is the conformance guest idling: no pages dirtied a tick, no
// console, at most 1000 ticks a second so that an idle guest leaves the
// host's CPUs to the work measured.
func benchSpec(mem int64) runner.Spec {
	return runner.Spec{MemSize: mem, Kernel: guestPath, Cmdline: "pages_per_tick=0 print_every=0 tick_rate=1000"}
}

// dataPages is how many pages the guest's fill and report cover.
func dataPages(mem int64) uint32 { return uint32((mem - guest.DataStart) / memstore.PageSize) }

func sizeName(n int64) string {
	if n >= 1<<30 && n%(1<<30) == 0 {
		return fmt.Sprintf("%dGiB", n>>30)
	}
	return fmt.Sprintf("%dMiB", n/mib)
}

// samples are durations of one measured part, one per iteration.
type samples []time.Duration

// pct is the p-th percentile (nearest rank) in milliseconds.
func (s samples) pct(p float64) float64 {
	if len(s) == 0 {
		return 0
	}
	sorted := slices.Clone(s)
	slices.Sort(sorted)
	i := int(p*float64(len(sorted))+0.999999) - 1
	i = max(0, min(i, len(sorted)-1))
	return float64(sorted[i]) / float64(time.Millisecond)
}

// timings collects named samples and reports them.
type timings struct {
	names []string
	s     map[string]samples
}

func newTimings() *timings { return &timings{s: map[string]samples{}} }

func (t *timings) add(name string, d time.Duration) {
	if _, ok := t.s[name]; !ok {
		t.names = append(t.names, name)
	}
	t.s[name] = append(t.s[name], d)
}

// addPhases adds the parts of a restore finer than its steps, as "p-"
// names: within the VMM (from spawned to the vCPU state set: p-request
// is the request's way there and its decoding), then p-answer, the
// answer's way back to the runner (until restored).
func (t *timings) addPhases(m *Machine, spawned, restored time.Duration) {
	prev := spawned
	for _, ph := range m.phases {
		at := time.Duration(ph.At)
		t.add("p-"+ph.Name, at-prev)
		prev = at
	}
	if len(m.phases) > 0 {
		t.add("p-answer", restored-prev)
	}
}

// report reports p50 and p99 of the names in both, and p50 of the rest.
func (t *timings) report(b *testing.B, both ...string) {
	b.ReportMetric(0, "ns/op")
	for _, n := range t.names {
		b.ReportMetric(t.s[n].pct(0.50), n+"-p50-ms")
		if slices.Contains(both, n) {
			b.ReportMetric(t.s[n].pct(0.99), n+"-p99-ms")
		}
	}
}

// boot starts an idle guest and returns it running.
func boot(b *testing.B, r *Runner, mem int64) *Machine {
	b.Helper()
	m, err := r.Start(context.Background(), benchSpec(mem))
	if err != nil {
		b.Fatal(err)
	}
	km := m.(*Machine)
	b.Cleanup(func() { _ = km.Stop(context.Background()) })
	return km
}

// fill has the guest write count fresh pages from data page first.
func fill(b *testing.B, m *Machine, first, count uint32) {
	b.Helper()
	if count == 0 {
		return
	}
	if err := m.fill(first, count); err != nil {
		b.Fatal(err)
	}
}

// TestBenchInstruments checks what the benchmarks rely on: CmdFill dirties
// exactly the pages asked for (and skips those past the end of memory), and
// first_exit tells when a resumed vCPU first exited.
func TestBenchInstruments(t *testing.T) {
	r, _ := newRunner(t)
	ctx := context.Background()
	mem := int64(16 * mib)
	pm, err := r.Start(ctx, runner.Spec{MemSize: mem, Kernel: guestPath, Cmdline: "pages_per_tick=0 print_every=0"})
	if err != nil {
		t.Fatal(err)
	}
	m := pm.(*Machine)
	defer m.Stop(ctx)
	if _, err := m.Snapshot(ctx, "base", runner.SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	last := dataPages(mem) - 1
	for _, c := range []struct{ first, count, want uint32 }{{10, 100, 100}, {last - 4, 10, 5}} {
		if err := m.fill(c.first, c.count); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("fill-%d", c.first)
		s, err := m.Snapshot(ctx, name, runner.SnapshotOptions{Incremental: true})
		if err != nil {
			t.Fatal(err)
		}
		mi, _ := s.Map("memory")
		// Besides the pages filled: the guest's state page and its fill pattern.
		if mi.Changed < int64(c.want) || mi.Changed > int64(c.want)+2 || mi.NewChunks < int64(c.want) {
			t.Fatalf("fill of %d pages from %d: %d pages changed, %d chunks new; want %d (+2)", c.count, c.first, mi.Changed, mi.NewChunks, c.want)
		}
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	before := monotonic()
	if err := m.Continue(ctx); err != nil {
		t.Fatal(err)
	}
	at, err := m.firstExit()
	if err != nil {
		t.Fatal(err)
	}
	if at < before || at > monotonic() {
		t.Fatalf("first exit at %v, resumed at %v", at, before)
	}
}

// BenchmarkFork forks a running guest as the box manager does
// (SnapshotForFork): the parent is paused, the pages dirtied since its
// previous snapshot are copied to host memory (the snapshot is written to
// the store in the background, untimed), a new VMM process restores the
// vCPU state, receives guest memory's userfaultfd (served lazily by the
// runner, from those pages over the store) and resumes. The fork ends when
// the child's vCPU has run until its first exit. Parts: snapshot (state:
// vCPU state saved; dirtylog: KVM's dirty log read; capture: dirty pages
// copied to host memory) and spawn-to-run (spawn: the VMM
// process started; vmm-restore: it came up, built the VM and vCPU and sent
// the userfaultfd; serve-setup: the page-fault server resolved the
// snapshot's page table; resume-run: the vCPU resumed and ran to its first
// exit, faulting its first pages in; the resume request's answer and the
// vCPU's start overlap, so they are one part).
//
// The qemu sub-benchmarks time QEMU's fork recipe on the same host: guest
// RAM in a shared file on tmpfs, QMP stop, migrate of the device state only
// (x-ignore-shared) to a file; a new QEMU started with -incoming defer on a
// private mapping of that file until it is ready for migrate-incoming; then
// migrate-incoming and cont.
//
// The warm=1 sub-benchmarks keep one VMM process waiting with its VM built
// (Runner.Pool 1), as boxd's daemon does (backends.KVMPool); the others
// start a process each fork.
func BenchmarkFork(b *testing.B) {
	for _, mem := range []int64{256 * mib, 1 << 30} {
		for _, dirty := range []int64{0, 16 * mib, 64 * mib} {
			b.Run(fmt.Sprintf("boxd/mem=%s/dirty=%s", sizeName(mem), sizeName(dirty)), func(b *testing.B) {
				benchFork(b, mem, dirty, 0)
			})
		}
		for _, dirty := range []int64{0, 16 * mib} {
			b.Run(fmt.Sprintf("boxd/mem=%s/dirty=%s/warm=1", sizeName(mem), sizeName(dirty)), func(b *testing.B) {
				benchFork(b, mem, dirty, 1)
			})
		}
	}
	for _, mem := range []int64{256 * mib, 1 << 30} {
		b.Run(fmt.Sprintf("qemu/mem=%s", sizeName(mem)), func(b *testing.B) {
			benchQEMUFork(b, mem)
		})
	}
}

func benchFork(b *testing.B, mem, dirty int64, warm int) {
	ctx := context.Background()
	r, st := benchRunner(b)
	r.Pool = warm
	b.Cleanup(func() { r.Close() })
	parent := boot(b, r, mem)
	if err := parent.Pause(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := parent.Snapshot(ctx, "base", runner.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := parent.Continue(ctx); err != nil {
		b.Fatal(err)
	}
	pages := uint32(dirty / memstore.PageSize)
	t := newTimings()
	var stored, changed int64
	i := 0
	for b.Loop() {
		i++
		fill(b, parent, 0, pages)
		waitPool(r)
		if err := parent.Pause(ctx); err != nil {
			b.Fatal(err)
		}
		paused := monotonic()
		snap, err := parent.SnapshotForFork(ctx, fmt.Sprintf("fork-%d", i), runner.SnapshotOptions{Incremental: true})
		if err != nil {
			b.Fatal(err)
		}
		snapped := st.at[stepCaptured]
		child, err := r.Restore(ctx, snap.Name, runner.RestoreOptions{})
		if err != nil {
			b.Fatal(err)
		}
		km := child.(*Machine)
		ran, err := km.firstExit()
		if err != nil {
			b.Fatal(err)
		}
		t.add("fork", ran-paused)
		t.add("snapshot", snapped-paused)
		t.add("spawn-to-run", ran-snapped)
		t.add("state", st.at[stepState]-paused)
		t.add("dirtylog", st.at[stepDirty]-st.at[stepState])
		t.add("capture", snapped-st.at[stepDirty])
		t.add("spawn", st.at[stepSpawned]-snapped)
		t.add("vmm-restore", st.at[stepRestored]-st.at[stepSpawned])
		t.add("serve-setup", st.at[stepServing]-st.at[stepRestored])
		t.add("resume-run", ran-st.at[stepServing])
		t.addPhases(km, st.at[stepSpawned], st.at[stepRestored])
		// The snapshot reaches the store in the background: count what
		// it stored once it has.
		if snap, err = r.Committed(ctx, snap.Name); err != nil {
			b.Fatal(err)
		}
		if mi, ok := snap.Map("memory"); ok {
			stored += mi.NewStored
			changed += mi.Changed
		}
		if err := child.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		if err := parent.Continue(ctx); err != nil {
			b.Fatal(err)
		}
	}
	t.report(b, "fork", "snapshot", "spawn-to-run")
	b.ReportMetric(float64(changed)/float64(i), "pages-stored/op")
	b.Logf("%d forks of a %s guest with %s dirty: %.1f pages and %.2f MiB stored a fork", i, sizeName(mem), sizeName(dirty), float64(changed)/float64(i), float64(stored)/float64(i)/mib)
}

// BenchmarkHibernate hibernates a guest that was resumed from its previous
// hibernation and dirtied 16 MiB since: pause, an incremental snapshot,
// stop (the VMM process gone, its memory freed; the working set of the
// restore is saved). Parts: snapshot (pause included) and stop.
func BenchmarkHibernate(b *testing.B) {
	for _, mem := range []int64{256 * mib, 1 << 30} {
		b.Run(fmt.Sprintf("mem=%s/dirty=16MiB", sizeName(mem)), func(b *testing.B) {
			benchHibernate(b, mem, 16*mib)
		})
	}
}

func benchHibernate(b *testing.B, mem, dirty int64) {
	ctx := context.Background()
	r, _ := benchRunner(b)
	first := boot(b, r, mem)
	if _, err := first.Snapshot(ctx, "hib-0", runner.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := first.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	t := newTimings()
	last := "hib-0"
	i := 0
	for b.Loop() {
		i++
		m, err := r.Restore(ctx, last, runner.RestoreOptions{})
		if err != nil {
			b.Fatal(err)
		}
		km := m.(*Machine)
		fill(b, km, 0, uint32(dirty/memstore.PageSize))
		start := monotonic()
		if err := m.Pause(ctx); err != nil {
			b.Fatal(err)
		}
		last = fmt.Sprintf("hib-%d", i)
		if _, err := m.Snapshot(ctx, last, runner.SnapshotOptions{Incremental: true}); err != nil {
			b.Fatal(err)
		}
		snapped := monotonic()
		if err := m.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		stopped := monotonic()
		t.add("hibernate", stopped-start)
		t.add("snapshot", snapped-start)
		t.add("stop", stopped-snapped)
	}
	t.report(b, "hibernate")
}

// BenchmarkResume restores a hibernated guest (16 MiB of its memory
// written) until its vCPU has run to its first exit: the state read from
// the store, the VMM process spawned, the VM and vCPU built, the
// userfaultfd handed over, the page table resolved, the vCPU resumed.
// From the second restore on, the working set recorded by the previous one
// is prefetched as well.
func BenchmarkResume(b *testing.B) {
	for _, mem := range []int64{256 * mib, 1 << 30} {
		for _, warm := range []int{0, 1} {
			b.Run(fmt.Sprintf("mem=%s/warm=%d", sizeName(mem), warm), func(b *testing.B) {
				benchResume(b, mem, warm)
			})
		}
	}
}

// waitPool waits, outside the timed part, until the runner's pool is full.
func waitPool(r *Runner) {
	for {
		r.refill()
		r.poolMu.Lock()
		n := len(r.pool)
		r.poolMu.Unlock()
		if n >= r.Pool {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func benchResume(b *testing.B, mem int64, warm int) {
	ctx := context.Background()
	r, st := benchRunner(b)
	r.Pool = warm
	b.Cleanup(func() { r.Close() })
	m := boot(b, r, mem)
	fill(b, m, 0, 16*mib/memstore.PageSize)
	if _, err := m.Snapshot(ctx, "hib", runner.SnapshotOptions{}); err != nil {
		b.Fatal(err)
	}
	if err := m.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	t := newTimings()
	for b.Loop() {
		b.StopTimer()
		waitPool(r)
		b.StartTimer()
		start := monotonic()
		m, err := r.Restore(ctx, "hib", runner.RestoreOptions{})
		if err != nil {
			b.Fatal(err)
		}
		ran, err := m.(*Machine).firstExit()
		if err != nil {
			b.Fatal(err)
		}
		t.add("resume", ran-start)
		t.add("read-and-spawn", st.at[stepSpawned]-start) // the state blob read from the store, the VMM process started
		t.add("vmm-restore", st.at[stepRestored]-st.at[stepSpawned])
		t.add("serve-setup", st.at[stepServing]-st.at[stepRestored])
		t.add("resume-run", ran-st.at[stepServing])
		t.addPhases(m.(*Machine), st.at[stepSpawned], st.at[stepRestored])
		if err := m.Stop(ctx); err != nil {
			b.Fatal(err)
		}
	}
	t.report(b, "resume")
}

// BenchmarkRetouch measures how long a restored guest takes to touch its
// working set again: the guest's report reads the first word of every data
// page. Its snapshot has 64 MiB of fresh data, the rest zero pages. Each
// iteration restores the snapshot twice: first with prefetch off (every
// page faults in, a window at a time; Stop records the faults as the
// working set), then with the working set just recorded prefetched. The
// second report on that machine, with every page resident, is the guest's
// own cost (resident). The figures run from the resume of a machine
// restored paused to the report's answer.
func BenchmarkRetouch(b *testing.B) {
	mem := int64(256 * mib)
	b.Run(fmt.Sprintf("mem=%s/data=64MiB", sizeName(mem)), func(b *testing.B) {
		ctx := context.Background()
		r, _ := benchRunner(b)
		m := boot(b, r, mem)
		fill(b, m, 0, 64*mib/memstore.PageSize)
		if _, err := m.Snapshot(ctx, "ws", runner.SnapshotOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := m.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		t := newTimings()
		var coldFaults, faults, prefetched, wsLen int64
		n := 0
		for b.Loop() {
			n++
			// Prefetch off: an empty list, not the recorded working set.
			r.Memory.Prefetch = []uint64{}
			cold, s := retouch(b, r, "ws", false)
			t.add("cold", cold)
			coldFaults += s.Faults
			ws, _, err := r.Graph.WorkingSet("ws", "memory")
			if err != nil {
				b.Fatal(err)
			}
			wsLen += int64(len(ws))
			r.Memory.Prefetch = nil
			warm, s := retouch(b, r, "ws", true)
			t.add("prefetch", warm)
			faults += s.Faults
			prefetched += s.Prefetched
			t.add("resident", s.resident)
		}
		t.report(b, "cold", "prefetch")
		b.ReportMetric(float64(coldFaults)/float64(n), "cold-faults/op")
		b.ReportMetric(float64(faults)/float64(n), "prefetch-faults/op")
		b.ReportMetric(float64(prefetched)/float64(n), "prefetched-pages/op")
		b.Logf("working set recorded by a cold restore: %d pages (of %d data pages); the prefetching restore still faulted %d times",
			wsLen/int64(n), dataPages(mem), faults/int64(n))
	})
}

type retouchStats struct {
	Faults, Prefetched int64
	resident           time.Duration
}

// retouch restores snap paused, resumes it with a report request and times
// the report; with resident, it times a second report too.
func retouch(b *testing.B, r *Runner, snap string, resident bool) (time.Duration, retouchStats) {
	b.Helper()
	ctx := context.Background()
	m, err := r.Restore(ctx, snap, runner.RestoreOptions{Paused: true})
	if err != nil {
		b.Fatal(err)
	}
	km := m.(*Machine)
	start := monotonic()
	if _, err := km.Report(ctx); err != nil {
		b.Fatal(err)
	}
	d := monotonic() - start
	var rs retouchStats
	if resident {
		start := monotonic()
		if _, err := km.Report(ctx); err != nil {
			b.Fatal(err)
		}
		rs.resident = monotonic() - start
	}
	s := km.Server().Stats()
	rs.Faults, rs.Prefetched = s.Faults, s.Prefetched
	if err := m.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	return d, rs
}

// --- QEMU ---

func benchQEMUFork(b *testing.B, mem int64) {
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		b.Skip("qemu-system-x86_64 is not installed (bench/kvm.sh installs Debian's qemu-system-x86): no QEMU figures")
	}
	shm := "/dev/shm"
	if fi, err := os.Stat(shm); err != nil || !fi.IsDir() {
		b.Skipf("needs a tmpfs at %s for QEMU's shared guest memory: %v", shm, err)
	}
	dir, err := os.MkdirTemp(shm, "boxd-bench-qemu")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	memFile := filepath.Join(dir, "ram")
	stateFile := filepath.Join(dir, "state")

	src, err := startQEMU(b, bin, dir, "src", mem, memFile, true)
	if err != nil {
		b.Fatal(err)
	}
	defer src.kill()
	if err := src.q.setCaps(); err != nil {
		b.Fatal(err)
	}
	t := newTimings()
	var stateBytes int64
	i := 0
	for b.Loop() {
		i++
		if _, err := src.q.execute("stop", nil); err != nil {
			b.Fatal(err)
		}
		paused := monotonic()
		if _, err := src.q.execute("migrate", map[string]any{"uri": "exec:cat > " + stateFile}); err != nil {
			b.Fatal(err)
		}
		if err := src.q.waitMigration(30 * time.Second); err != nil {
			b.Fatal(err)
		}
		saved := monotonic()
		child, err := startQEMU(b, bin, dir, fmt.Sprintf("child-%d", i), mem, memFile, false)
		if err != nil {
			b.Fatal(err)
		}
		if err := child.q.setCaps(); err != nil {
			child.kill()
			b.Fatal(err)
		}
		ready := monotonic()
		if _, err := child.q.execute("migrate-incoming", map[string]any{"uri": "exec:cat " + stateFile}); err != nil {
			child.kill()
			b.Fatal(err)
		}
		if err := child.q.waitMigration(30 * time.Second); err != nil {
			child.kill()
			b.Fatal(err)
		}
		if _, err := child.q.execute("cont", nil); err != nil {
			child.kill()
			b.Fatal(err)
		}
		running := monotonic()
		t.add("fork", running-paused)
		t.add("device-state-save", saved-paused)
		t.add("spawn-to-incoming", ready-saved)
		t.add("incoming-and-cont", running-ready)
		if fi, err := os.Stat(stateFile); err == nil {
			stateBytes = fi.Size()
		}
		child.kill()
		if _, err := src.q.execute("cont", nil); err != nil {
			b.Fatal(err)
		}
	}
	t.report(b, "fork", "device-state-save", "spawn-to-incoming", "incoming-and-cont")
	b.Logf("QEMU %s under TCG, no kernel (SeaBIOS idle): device state of %d KiB a fork", sizeName(mem), stateBytes/1024)
}

// qemuProc is a QEMU process and its QMP connection.
type qemuProc struct {
	cmd *exec.Cmd
	q   *qmp
}

func (p *qemuProc) kill() {
	if p.q != nil {
		p.q.conn.Close()
	}
	_ = p.cmd.Process.Kill()
	_ = p.cmd.Wait()
}

// startQEMU starts a QEMU with no kernel and no devices, its RAM a file on
// tmpfs: shared (the source, whose RAM migration skips) or a private,
// copy-on-write mapping (a child, paused and waiting for migrate-incoming).
// It returns once QMP has accepted qmp_capabilities.
func startQEMU(b *testing.B, bin, dir, name string, mem int64, memFile string, shared bool) (*qemuProc, error) {
	sock := filepath.Join(dir, name+".qmp")
	share := "off"
	if shared {
		share = "on"
	}
	args := []string{
		"-nodefaults", "-display", "none", "-accel", "tcg",
		"-machine", "q35,memory-backend=ram",
		"-m", fmt.Sprintf("%dM", mem/mib),
		"-object", fmt.Sprintf("memory-backend-file,id=ram,size=%dM,mem-path=%s,share=%s", mem/mib, memFile, share),
		"-qmp", "unix:" + sock + ",server=on,wait=off",
	}
	if !shared {
		args = append(args, "-S", "-incoming", "defer")
	}
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &qemuProc{cmd: cmd}
	q, err := dialQMP(sock, 30*time.Second)
	if err != nil {
		p.kill()
		return nil, fmt.Errorf("qemu %s: %w (stderr: %s)", name, err, strings.TrimSpace(stderr.String()))
	}
	p.q = q
	return p, nil
}

// qmp is a QMP client: one command at a time, events kept until waited for.
type qmp struct {
	conn   net.Conn
	rd     *bufio.Reader
	events []qmpMessage
}

type qmpMessage struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	QMP   json.RawMessage `json:"QMP"`
}

// dialQMP connects to a QMP socket as soon as it exists, reads the greeting
// and leaves capabilities negotiation mode.
func dialQMP(sock string, timeout time.Duration) (*qmp, error) {
	deadline := time.Now().Add(timeout)
	var conn net.Conn
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			conn = c
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("QMP socket: %w", err)
		}
		time.Sleep(200 * time.Microsecond)
	}
	q := &qmp{conn: conn, rd: bufio.NewReader(conn)}
	_ = conn.SetDeadline(deadline)
	msg, err := q.read()
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if msg.QMP == nil {
		conn.Close()
		return nil, errors.New("QMP: no greeting")
	}
	if _, err := q.execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) read() (qmpMessage, error) {
	var m qmpMessage
	line, err := q.rd.ReadBytes('\n')
	if err != nil {
		return m, err
	}
	err = json.Unmarshal(line, &m)
	return m, err
}

// execute runs one command and returns its answer.
func (q *qmp) execute(cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	line, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	_ = q.conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := q.conn.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		m, err := q.read()
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		switch {
		case m.Event != "":
			q.events = append(q.events, m)
		case m.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
		case m.Return != nil:
			return m.Return, nil
		}
	}
}

// setCaps turns on migration events and x-ignore-shared (RAM in a shared
// file is not migrated).
func (q *qmp) setCaps() error {
	_, err := q.execute("migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
		{"capability": "x-ignore-shared", "state": true},
		{"capability": "events", "state": true},
	}})
	return err
}

// waitMigration waits for a MIGRATION event saying completed (or failed).
func (q *qmp) waitMigration(timeout time.Duration) error {
	_ = q.conn.SetDeadline(time.Now().Add(timeout))
	for {
		var m qmpMessage
		if len(q.events) > 0 {
			m, q.events = q.events[0], q.events[1:]
		} else {
			var err error
			if m, err = q.read(); err != nil {
				return fmt.Errorf("waiting for migration: %w", err)
			}
		}
		if m.Event != "MIGRATION" {
			continue
		}
		var d struct {
			Status string `json:"status"`
		}
		_ = json.Unmarshal(m.Data, &d)
		switch d.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s", d.Status)
		}
	}
}
