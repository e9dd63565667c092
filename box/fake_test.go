package box_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// fakeRunner is a runner backend for the box manager's fast tests: no VM.
// A machine is the real agent (agent.Serve) on a unix socket, running
// commands on this host, with a System that records what Unique asked
// instead of changing the host. Snapshots are real snapshots in the store
// (a page of memory), disks are files that name the file they stand on,
// and a snapshot freezes the disk's top as a layer, as runner/qemu does.
// It has every optional capability but Forker unless forker is set.
type fakeRunner struct {
	name   string
	g      *snapshotter.Graph
	dir    string
	forker bool

	mu       sync.Mutex
	ids      int
	snapErr  error           // every Snapshot fails with it while set
	startErr error           // every Start and Restore fails with it while set
	restores []fakeRestore   // every Restore, in order
	released []string        // ReleaseSnapshot calls
	removed  []string        // SnapshotRemoved calls
	machines []*fakeMachine  // every machine started
	pending  map[string]bool // snapshots SnapshotForFork took, until Flush
	spares   int             // spares asked for (StartSpares), in all
	// writeAfter is the last SnapshotForFork's WriteAfter; atRestore is, for each Restore after it, whether it
	// was closed then and how many spares had been asked for.
	writeAfter <-chan struct{}
	atRestore  []fakeForkState
}

// fakeForkState is what a Restore saw of the fork before it.
type fakeForkState struct {
	writeReleased bool
	spares        int
}

// closed says whether ch is closed; false for nil.
func closed(ch <-chan struct{}) bool {
	if ch == nil {
		return false
	}
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

type fakeRestore struct {
	Snapshot  string
	LongLived bool
}

func newFakeRunner(t *testing.T, g *snapshotter.Graph, forker bool) *fakeRunner {
	dir, err := os.MkdirTemp("", "boxd-fake-") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return &fakeRunner{name: "fake", g: g, dir: dir, forker: forker, pending: map[string]bool{}}
}

func (r *fakeRunner) Name() string { return r.name }

func (r *fakeRunner) Capabilities() runner.Capabilities {
	return runner.Capabilities{Linux: true, IncrementalSnapshots: true}
}

const fakeSpecLabel = "boxd.fake.spec"
const fakeDiskLabel = "boxd.fake.disk"

func (r *fakeRunner) Start(ctx context.Context, spec runner.Spec) (runner.Machine, error) {
	if err := r.failure(); err != nil {
		return nil, err
	}
	if spec.Kernel == "" || spec.Disk == nil {
		return nil, fmt.Errorf("fake: a kernel and a disk, please: %w", errdefs.ErrInvalidArgument)
	}
	if _, err := os.Stat(spec.Disk.Path); err != nil {
		return nil, fmt.Errorf("fake: disk: %w", err)
	}
	m, err := r.launch(spec, "", spec.Disk.Base)
	if err != nil {
		return nil, err
	}
	return r.wrap(m), nil
}

// wrap gives m the Forker capability when the runner has it.
func (r *fakeRunner) wrap(m *fakeMachine) runner.Machine {
	if r.forker {
		return &fakeForkMachine{fakeMachine: m}
	}
	return m
}

func (r *fakeRunner) Restore(ctx context.Context, snap string, opts runner.RestoreOptions) (runner.Machine, error) {
	if err := r.failure(); err != nil {
		return nil, err
	}
	s, err := r.g.Get(snap)
	if err != nil {
		return nil, err
	}
	spec, err := r.SnapshotSpec(s)
	if err != nil {
		return nil, err
	}
	disk := opts.Disk
	if disk == "" {
		disk = filepath.Join(r.dir, fmt.Sprintf("restore-%d.disk", r.nextID()))
	}
	if err := writeDisk(disk, s.Labels[fakeDiskLabel]); err != nil {
		return nil, err
	}
	spec.Disk, spec.Console = &runner.Disk{Path: disk}, opts.Console
	r.mu.Lock()
	r.restores = append(r.restores, fakeRestore{snap, opts.LongLived})
	if r.writeAfter != nil {
		r.atRestore = append(r.atRestore, fakeForkState{writeReleased: closed(r.writeAfter), spares: r.spares})
	}
	r.mu.Unlock()
	m, err := r.launch(spec, snap, "")
	if err != nil {
		return nil, err
	}
	if opts.Paused {
		_ = m.Pause(ctx)
	}
	return r.wrap(m), nil
}

func (r *fakeRunner) nextID() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ids++
	return r.ids
}

func (r *fakeRunner) launch(spec runner.Spec, last, base string) (*fakeMachine, error) {
	id := r.nextID()
	m := &fakeMachine{
		r: r, id: fmt.Sprintf("fake-%d", id), spec: spec, disk: spec.Disk.Path, last: last, base: base,
		socket: filepath.Join(r.dir, fmt.Sprintf("agent-%d.sock", id)), done: make(chan struct{}),
		sys: &fakeSystem{},
	}
	l, err := net.Listen("unix", m.socket)
	if err != nil {
		return nil, err
	}
	m.l = l
	go m.serve()
	r.mu.Lock()
	r.machines = append(r.machines, m)
	r.mu.Unlock()
	return m, nil
}

// The disks: a file whose first line names the file it stands on.
func writeDisk(path, over string) error {
	return os.WriteFile(path, []byte("over:"+over+"\n"), 0o600)
}

func (r *fakeRunner) CreateDisk(_ context.Context, path, base string) error {
	if _, err := os.Stat(base); err != nil {
		return err
	}
	return writeDisk(path, base)
}

func (r *fakeRunner) DiskChain(path string) []string {
	var chain []string
	for range 100 {
		b, err := os.ReadFile(path)
		if err != nil {
			break
		}
		chain = append(chain, path)
		line, _, _ := strings.Cut(string(b), "\n")
		next, ok := strings.CutPrefix(line, "over:")
		if !ok || next == "" {
			break
		}
		path = next
	}
	return chain
}

func (r *fakeRunner) SnapshotDisk(s snapshotter.Snapshot) string { return s.Labels[fakeDiskLabel] }

func (r *fakeRunner) DiskOrigin(file string) string {
	base := filepath.Base(file)
	i := strings.Index(base, "@")
	if i <= 0 {
		return ""
	}
	return filepath.Join(filepath.Dir(file), base[:i])
}

func (r *fakeRunner) Flush(context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.pending)
	return nil
}

func (r *fakeRunner) Pending() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for n := range r.pending {
		out = append(out, n)
	}
	return out
}

func (r *fakeRunner) ReleaseSnapshot(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.released = append(r.released, name)
}

func (r *fakeRunner) SnapshotRemoved(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.removed = append(r.removed, name)
}

func (r *fakeRunner) SnapshotSpec(s snapshotter.Snapshot) (runner.Spec, error) {
	if s.Labels[runner.LabelRunner] != r.name {
		return runner.Spec{}, fmt.Errorf("fake: not mine: %w", errdefs.ErrInvalidArgument)
	}
	var spec runner.Spec
	err := json.Unmarshal([]byte(s.Labels[fakeSpecLabel]), &spec)
	return spec, err
}

// failure is startErr.
func (r *fakeRunner) failure() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.startErr
}

func (r *fakeRunner) setStartErr(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.startErr = err
}

func (r *fakeRunner) setSnapErr(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.snapErr = err
}

// fakeMachine is one fake machine: an agent on a socket.
type fakeMachine struct {
	r      *fakeRunner
	id     string
	spec   runner.Spec
	socket string
	l      net.Listener
	sys    *fakeSystem
	cpu    atomic.Int64

	mu         sync.Mutex
	disk, last string
	base       string
	paused     bool
	ranOn      bool // ran after its last snapshot: a snapshot taken running goes on after, as a real one does
	done       chan struct{}
	err        error
}

func (m *fakeMachine) serve() {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-m.done; cancel() }()
	for {
		c, err := m.l.Accept()
		if err != nil {
			return
		}
		go func() { _ = agent.Serve(ctx, c, &agent.ServerConfig{System: m.sys}) }()
	}
}

func (m *fakeMachine) ID() string { return m.id }

func (m *fakeMachine) Pause(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return m.err
	}
	m.paused = true
	return nil
}

func (m *fakeMachine) Continue(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return m.err
	}
	m.paused = false
	m.ranOn = true
	return nil
}

// ranAfterSnapshot says whether the machine ran after its last snapshot.
func (m *fakeMachine) ranAfterSnapshot() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ranOn
}

// isPaused says whether the machine is paused.
func (m *fakeMachine) isPaused() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.paused
}

func (m *fakeMachine) Snapshot(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	m.r.mu.Lock()
	snapErr := m.r.snapErr
	m.r.mu.Unlock()
	if snapErr != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("fake: writing snapshot %s: %w", name, snapErr)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return snapshotter.Snapshot{}, m.err
	}
	// The top freezes; a new top takes over, named ORIGIN@SNAP.
	frozen := m.disk
	origin := filepath.Base(m.disk)
	if i := strings.Index(origin, "@"); i >= 0 {
		origin = origin[:i]
	}
	top := filepath.Join(filepath.Dir(m.disk), origin+"@"+name)
	if err := writeDisk(top, frozen); err != nil {
		return snapshotter.Snapshot{}, err
	}
	spec := m.spec
	spec.Disk, spec.Console = nil, ""
	sj, _ := json.Marshal(spec)
	labels := map[string]string{runner.LabelRunner: m.r.name, fakeSpecLabel: string(sj), fakeDiskLabel: frozen}
	for k, v := range opts.Labels {
		labels[k] = v
	}
	parent := m.last
	if parent == "" {
		parent = m.base
	}
	s, err := m.r.g.Ingest(ctx, bytes.NewReader([]byte(m.id+" at "+name)), snapshotter.IngestOptions{
		Name: name, Parent: parent, Kind: snapshotter.KindMemory, Labels: labels,
	})
	if err != nil {
		_ = os.Remove(top)
		return snapshotter.Snapshot{}, err
	}
	m.disk, m.last = top, name
	m.ranOn = !m.paused
	return s, nil
}

func (m *fakeMachine) Stop(context.Context) error {
	m.die(runner.ErrStopped)
	return nil
}

// die ends the machine with err, as a machine that exits on its own.
func (m *fakeMachine) die(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return
	}
	m.err = err
	_ = m.l.Close()
	close(m.done)
}

func (m *fakeMachine) Done() <-chan struct{} { return m.done }

func (m *fakeMachine) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

func (m *fakeMachine) Console() []byte { return []byte("fake console of " + m.id + "\n") }

func (m *fakeMachine) AgentSocket() string { return m.socket }

func (m *fakeMachine) CPUTime() (time.Duration, error) {
	if err := m.Err(); err != nil {
		return 0, err
	}
	return time.Duration(m.cpu.Add(int64(time.Millisecond))), nil
}

// fakeMemory is what every fake machine holds of the host.
var fakeMemory = runner.MemoryUse{RSS: 3 << 20, PSS: 2 << 20}

func (m *fakeMachine) Memory() (runner.MemoryUse, error) {
	if err := m.Err(); err != nil {
		return runner.MemoryUse{}, err
	}
	return fakeMemory, nil
}

func (m *fakeMachine) Disk() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.disk
}

// fakeForkMachine is a fakeMachine with runner.Forker.
type fakeForkMachine struct {
	*fakeMachine
	spares atomic.Int64
}

func (m *fakeForkMachine) SnapshotForFork(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	s, err := m.Snapshot(ctx, name, opts)
	if err == nil {
		m.r.mu.Lock()
		m.r.pending[name] = true
		m.r.writeAfter, m.r.atRestore = opts.WriteAfter, nil
		m.r.mu.Unlock()
	}
	return s, err
}

func (m *fakeForkMachine) StartSpares(_ context.Context, n int) error {
	m.spares.Store(int64(n))
	m.r.mu.Lock()
	m.r.spares += n
	m.r.mu.Unlock()
	return nil
}

// fakeSystem records what the agent's Unique requests asked.
type fakeSystem struct {
	mu                  sync.Mutex
	hostname, machineID string
	entropy             int
	clock               time.Time
}

func (s *fakeSystem) AddEntropy(seed []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entropy += len(seed)
	return nil
}

func (s *fakeSystem) SetClock(t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clock = t
	return nil
}

func (s *fakeSystem) SetHostname(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.hostname = name
	return nil
}

func (s *fakeSystem) SetMachineID(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.machineID = id
	return nil
}

func (s *fakeSystem) get() (hostname, machineID string, entropy int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.hostname, s.machineID, s.entropy
}

// clockSet is the clock the last Unique stepped the guest to.
func (s *fakeSystem) clockSet() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.clock
}

var _ = errors.Is
var _ runner.Forker = (*fakeForkMachine)(nil)

// Adopt takes over a machine of this runner that still runs, as a new
// manager on the same root does after the last one left it running.
func (r *fakeRunner) Adopt(_ context.Context, id string) (runner.Machine, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.machines {
		if m.id == id && m.Err() == nil {
			return r.wrap(m), nil
		}
	}
	return nil, fmt.Errorf("fake: machine %s is gone: %w", id, errdefs.ErrNotFound)
}
