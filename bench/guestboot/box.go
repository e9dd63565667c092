package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// bench holds what the measurements share.
type bench struct {
	g      *snapshotter.Graph
	r      *qemu.Runner
	root   string
	work   string // this run's files: disk overlays, consoles, the machines' folders
	memDir string // this run's guest memory files, on /dev/shm
	mem    int64

	kernel, modules, initrd string
	img                     guest.Image
	base                    string
	bareInitrd              string

	// mu protects the fields below: every machine started and client
	// dialled, so that tearDown ends them all.
	mu       sync.Mutex
	machines []*qemu.Machine
	clients  []*agent.Client
}

func (b *bench) track(m *qemu.Machine, c *agent.Client) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if m != nil {
		b.machines = append(b.machines, m)
	}
	if c != nil {
		b.clients = append(b.clients, c)
	}
}

// stopAll closes every client and stops every machine; each machine's Stop
// kills QEMU if it does not quit in time.
func (b *bench) stopAll() {
	b.mu.Lock()
	clients, machines := b.clients, b.machines
	b.clients, b.machines = nil, nil
	b.mu.Unlock()
	for _, c := range clients {
		_ = c.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, m := range machines {
		wg.Go(func() { _ = m.Stop(ctx) })
	}
	wg.Wait()
}

// tearDown stops every machine, removes this run's snapshots (and
// collects their chunks) and files, and closes the store.
func (b *bench) tearDown() {
	b.stopAll()
	if err := b.clearSnapshots(context.Background()); err != nil {
		benchkit.Progress("cleanup: %v", err)
	}
	for _, dir := range []string{b.work, b.memDir} {
		if dir != "" {
			if err := os.RemoveAll(dir); err != nil {
				benchkit.Progress("cleanup: %v", err)
			}
		}
	}
	if err := b.g.Close(); err != nil {
		benchkit.Progress("cleanup: %v", err)
	}
}

// clearSnapshots removes every snapshot the benchmark takes (children
// first) and, if there were any, collects the chunks only they held, so
// that the next run's snapshots add to a store that holds the image alone.
func (b *bench) clearSnapshots(ctx context.Context) error {
	all, err := b.g.List()
	if err != nil {
		return err
	}
	var ours []string
	for _, s := range all {
		if strings.HasPrefix(s.Name, snapPrefix) && s.Labels[runner.LabelRunner] == "qemu" {
			ours = append(ours, s.Name)
		}
	}
	if len(ours) == 0 {
		return nil
	}
	// List puts parents before their children.
	slices.Reverse(ours)
	var errs []error
	for _, name := range ours {
		if b.r != nil {
			b.r.SnapshotRemoved(name)
		}
		if err := b.g.Remove(name); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	st, err := b.g.GC(ctx, cas.GCOptions{})
	if err != nil {
		errs = append(errs, err)
	} else {
		benchkit.Progress("removed snapshots %s; gc freed %s", strings.Join(ours, ", "), benchkit.Size(st.BytesFreed))
	}
	return errors.Join(errs...)
}

// spec is the Spec of box name: the image's base file under its own disk
// overlay, boxd's initramfs and command line, and a console file.
func (b *bench) spec(name, disk, console string) runner.Spec {
	return runner.Spec{
		MemSize: b.mem,
		CPUs:    *cpus,
		Kernel:  b.kernel,
		Initrd:  b.initrd,
		Cmdline: guest.Cmdline(name),
		Console: console,
		Disk:    &runner.Disk{Path: disk, Base: b.img.Snapshot},
	}
}

// boxBoot is one box boot's figures, from the call to StartMachine.
type boxBoot struct {
	qmp       time.Duration // StartMachine returned: QEMU runs and QMP answers
	kernel    time.Duration // markKernel on the console (0: not seen)
	agentLine time.Duration // markAgent on the console (0: not seen)
	ready     time.Duration // agent.Dial returned: the agent answers
}

// bootBox makes box name's disk overlay and boots it until its agent
// answers; the machine and client are tracked.
func (b *bench) bootBox(ctx context.Context, name string) (*qemu.Machine, *agent.Client, boxBoot, error) {
	disk := filepath.Join(b.work, name+".qcow2")
	if err := qemu.CreateOverlay(ctx, disk, b.base); err != nil {
		return nil, nil, boxBoot{}, err
	}
	console := filepath.Join(b.work, name+".console")
	w := watchFile(console, markKernel, markAgent)
	defer w.stop()
	start := time.Now()
	m, err := b.r.StartMachine(ctx, b.spec(name, disk, console))
	if err != nil {
		return nil, nil, boxBoot{}, fmt.Errorf("box %s: %w", name, err)
	}
	var f boxBoot
	f.qmp = time.Since(start)
	b.track(m, nil)
	c, err := b.dial(ctx, m)
	if err != nil {
		return nil, nil, boxBoot{}, fmt.Errorf("box %s: %w", name, err)
	}
	f.ready = time.Since(start)
	b.track(nil, c)
	at := w.stop().since(start)
	f.kernel, f.agentLine = at[0], at[1]
	return m, c, f, nil
}

// dial waits for m's agent, as boxd does: until it answers, the machine
// stops, or the ready timeout passes.
func (b *bench) dial(ctx context.Context, m *qemu.Machine) (*agent.Client, error) {
	dctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	go func() { // a guest that dies ends the wait at once
		select {
		case <-m.Done():
			cancel()
		case <-dctx.Done():
		}
	}()
	c, err := agent.Dial(dctx, m.AgentSocket())
	if err != nil {
		why := err.Error()
		if m.Err() != nil {
			why = "the machine stopped: " + m.Err().Error()
		}
		return nil, fmt.Errorf("no agent (%s); the console ends with:\n%s", why, tail(m.Console(), 12))
	}
	return c, nil
}

// Lines the console shows on the way up. The kernel prints nothing with
// `quiet` (the box's command line has it), so the firmware's last line
// marks the kernel's start, and /init's first line the end of the boot.
const (
	markKernel = "Booting from ROM"  // SeaBIOS hands over to the kernel QEMU loaded
	markAgent  = "boxd-agent: ready" // the agent has its port open
)

// marks notes when each of a few strings first shows in a growing text.
type marks struct {
	want []string
	at   []time.Time
}

func newMarks(want ...string) *marks {
	return &marks{want: want, at: make([]time.Time, len(want))}
}

// see records the strings text holds that were not seen before; it says
// whether all have been seen.
func (k *marks) see(text []byte, now time.Time) bool {
	all := true
	for i, w := range k.want {
		if k.at[i].IsZero() && bytes.Contains(text, []byte(w)) {
			k.at[i] = now
		}
		all = all && !k.at[i].IsZero()
	}
	return all
}

// since returns when each string showed, from start (0 if it did not).
func (k *marks) since(start time.Time) []time.Duration {
	out := make([]time.Duration, len(k.at))
	for i, t := range k.at {
		if !t.IsZero() {
			out[i] = t.Sub(start)
		}
	}
	return out
}

// fileWatch polls a console file for marks.
type fileWatch struct {
	k    *marks
	done chan struct{}
	over chan struct{}
	once sync.Once
}

// watchFile reads path every 2 ms until it holds all of want or stop is
// called.
func watchFile(path string, want ...string) *fileWatch {
	w := &fileWatch{k: newMarks(want...), done: make(chan struct{}), over: make(chan struct{})}
	go func() {
		defer close(w.over)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			if b, err := os.ReadFile(path); err == nil && w.k.see(b, time.Now()) {
				return
			}
			select {
			case <-w.done:
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

// stop ends the watch and returns the marks; later calls return the same.
func (w *fileWatch) stop() *marks {
	w.once.Do(func() { close(w.done) })
	<-w.over
	return w.k
}

// execAgent runs `true` in the guest n times, after one untimed run, and
// returns each round trip.
func execAgent(ctx context.Context, c *agent.Client, n int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := range n + 1 {
		start := time.Now()
		code, err := c.Run(ctx, agent.Command{Args: []string{"true"}})
		took := time.Since(start)
		if err != nil {
			return nil, err
		}
		if code != 0 {
			return nil, fmt.Errorf("true in the guest exited %d", code)
		}
		if i > 0 {
			out = append(out, took)
		}
	}
	return out, nil
}

// execHost runs `true` on the host n times, after one untimed run.
func execHost(n int) ([]time.Duration, error) {
	path, err := exec.LookPath("true")
	if err != nil {
		return nil, err
	}
	out := make([]time.Duration, 0, n)
	for i := range n + 1 {
		start := time.Now()
		err := exec.Command(path).Run()
		took := time.Since(start)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			out = append(out, took)
		}
	}
	return out, nil
}

// snapshotted is one snapshot's figures.
type snapshotted struct {
	took   time.Duration
	added  int64 // pack bytes the store grew by
	before int64 // the store's pack bytes before
	snap   snapshotter.Snapshot
}

// snapshot takes snapshot name with take (a machine's Snapshot or Fork)
// and measures the time and the store's growth; later says the snapshot may
// reach the store after take returns (a Fork).
func (b *bench) snapshot(ctx context.Context, take func(context.Context, string, runner.SnapshotOptions) (snapshotter.Snapshot, error), name string, later bool, opts runner.SnapshotOptions) (snapshotted, error) {
	before, err := b.g.Store().Stats()
	if err != nil {
		return snapshotted{}, err
	}
	start := time.Now()
	s, err := take(ctx, name, opts)
	took := time.Since(start)
	if err != nil {
		return snapshotted{}, fmt.Errorf("snapshot %s: %w", name, err)
	}
	res := snapshotted{took: took, snap: s, before: before.PackBytes}
	if later {
		// Its bytes are counted by stored, once the forks run.
		return res, nil
	}
	return res, b.stored(ctx, &res)
}

// stored waits until s's snapshot is in the store and counts what it
// added.
func (b *bench) stored(ctx context.Context, s *snapshotted) error {
	snap, err := b.r.Committed(ctx, s.snap.Name)
	if err != nil {
		return err
	}
	after, err := b.g.Store().Stats()
	if err != nil {
		return err
	}
	s.snap, s.added = snap, after.PackBytes-s.before
	return nil
}

// allocated is the bytes a file takes on its file system.
func allocated(path string) (int64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Blocks * 512, nil
}

// restored is one restore's figures, from its request.
type restored struct {
	m       *qemu.Machine
	c       *agent.Client
	running time.Duration // RestoreMachine returned: the machine runs
	ready   time.Duration // agent.Dial returned
	unique  time.Duration // the agent took the new identity (agent.Unique)
}

// restore restores snapshot snap onto a new disk overlay at disk, waits
// for its agent and gives the guest u, as boxd's resume and fork do; times
// count from start.
//
// The disk is named, as boxd's box manager names it, rather than left to
// the runner: a machine restored onto a disk of the runner's own removes
// that overlay when it ends, though a later snapshot of the machine froze
// it and names it (qemu.LabelDisk), so every restore of that snapshot
// would first export the whole disk from the store.
func (b *bench) restore(ctx context.Context, snap, disk string, u agent.Unique, start time.Time) (restored, error) {
	m, err := b.r.RestoreMachine(ctx, snap, runner.RestoreOptions{Disk: disk})
	if err != nil {
		return restored{}, fmt.Errorf("restoring %s: %w", snap, err)
	}
	res := restored{m: m, running: time.Since(start)}
	b.track(m, nil)
	if res.c, err = b.dial(ctx, m); err != nil {
		return restored{}, fmt.Errorf("restore of %s: %w", snap, err)
	}
	res.ready = time.Since(start)
	b.track(nil, res.c)
	if err := res.c.Unique(ctx, u); err != nil {
		return restored{}, fmt.Errorf("restore of %s: %w", snap, err)
	}
	res.unique = time.Since(start)
	return res, nil
}

// sameBox is the identity a resumed box gets: fresh entropy and the clock,
// its own machine-id and hostname kept.
func sameBox() (agent.Unique, error) {
	u, err := agent.NewUnique("")
	u.MachineID = ""
	return u, err
}
