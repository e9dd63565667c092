// Package box is the box manager behind the daemon: each box's lifecycle
// (running, hibernated, stopped) kept in bbolt under boxd's root, booted,
// forked, hibernated and resumed through the runner backends it is given
// (package runner's interfaces and optional capabilities), and reached
// through its agent.
package box

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// States of a box.
const (
	StateRunning    = "running"
	StatePaused     = "paused"
	StateHibernated = "hibernated"
	StateStopped    = "stopped"
)

// Defaults for new boxes.
const (
	DefaultMemory = 512 << 20
	DefaultCPUs   = 1
)

// ReadyTimeout bounds how long a box may take from its machine's start to
// its agent answering (TCG boots take seconds).
var ReadyTimeout = 90 * time.Second

// Box is what the manager knows of one box.
type Box struct {
	Name     string    `json:"name"`
	State    string    `json:"state"`
	Image    string    `json:"image"`
	Memory   int64     `json:"memory"`
	CPUs     int       `json:"cpus"`
	Runner   string    `json:"runner,omitempty"`   // the runner it runs on ("" in records older than the field: Config.DefaultRunner)
	Keys     []string  `json:"keys,omitempty"`     // authorized public keys, authorized_keys lines
	Snapshot string    `json:"snapshot,omitempty"` // the last snapshot, which a hibernated box resumes from
	Parent   string    `json:"parent,omitempty"`   // the box it was forked from
	Disk     string    `json:"disk"`               // the writable top of its disk
	Created  time.Time `json:"created"`
	Snaps    int       `json:"snaps"` // snapshots taken, for names
	Note     string    `json:"note,omitempty"`
	// Inside says the box command inside it may fork it and act on its
	// forks (see serveInside); forks inherit it, and MaxForks.
	Inside bool `json:"inside,omitempty"`
	// MaxForks bounds the live forks (forks of forks counted) the box
	// command inside it may make.
	MaxForks int `json:"max_forks,omitempty"`
	// Owner is the SHA256 fingerprint of the registered key that made the
	// box over SSH (ssh boxd@host create), which alone sees and acts on it
	// there; its forks have the same owner. "" for a box made on the host.
	Owner string `json:"owner,omitempty"`
	// HostPorts are TCP ports on the host's loopback that the box may reach
	// at its gateway address, 10.0.2.2 (boxd create --expose-host-port).
	// Without them the box reaches no address of the host's. Forks do not
	// inherit them.
	HostPorts []uint16 `json:"host_ports,omitempty"`
	// Labels say what made the box and for what (the containerd shim's:
	// its namespace and container id); forks do not inherit them.
	Labels map[string]string `json:"labels,omitempty"`
	// BaseSnapshot, for a box made from a root file system that is not an
	// image (containerd's), is the snapshot its disk starts from; Image is
	// then empty. Forks inherit it.
	BaseSnapshot string `json:"base_snapshot,omitempty"`
}

// diskBase is the snapshot bx's disk starts from.
func (bx Box) diskBase() string {
	if bx.BaseSnapshot != "" {
		return bx.BaseSnapshot
	}
	return guest.SnapshotName(bx.Image)
}

// Config configures a Manager.
type Config struct {
	Root   string             // boxd's root
	Graph  *snapshotter.Graph // the store under Root
	Kernel string             // a kernel to boot instead of Debian's cloud kernel
	Logger *slog.Logger
	// Runners are the backends boxes may run on, each on Graph; a box
	// names its runner (Runner.Name).
	Runners []runner.Runner
	// DefaultRunner names the runner of RunnerAuto and of boxes recorded
	// before boxes named theirs; "" means the first of Runners.
	DefaultRunner string
	// Reserve is the host memory boxd keeps free: an operation that would
	// leave less is refused. 0 means 1 GiB or a twentieth of the host's
	// RAM, whichever is more; negative, none.
	Reserve int64
	// HostMemory says how much memory the host can give now; nil reads
	// MemAvailable from /proc/meminfo.
	HostMemory func() (int64, error)
	// Spares is how many machines wait, paused, for a fork of a box (one
	// booted, resumed, or just forked from) on a runner.Forker: a fork then
	// starts no process. 0 means DefaultSpares; negative, none.
	Spares int
	// Events takes an event for each change of a box's state (nil: none
	// are told).
	Events *events.Exchange
	// ForkMovesParent makes a running parent that owns its memory end in
	// its fork's snapshot, its memory frozen rather than copied, and go on
	// in a new machine on that memory, as its children do; its agent link
	// moves with it (forkmove.go).
	ForkMovesParent bool
}

// DefaultSpares is the spares each box has by default: enough for a
// fork into two boxes (the parent goes on in its own machine).
const DefaultSpares = 2

// Manager owns the boxes of one root.
type Manager struct {
	cfg     Config
	db      *bolt.DB
	runners map[string]runner.Runner
	log     *slog.Logger

	mu       sync.Mutex
	locks    map[string]*sync.Mutex // one operation per box at a time
	machines map[string]runner.Machine
	clients  map[string]*agent.Client
	// held is the clients of boxes between machines (held.go).
	held map[string]*agent.Client

	usage usageState // what Usage keeps (usage.go)

	// left says LeaveRunning closed the manager: machines that end from
	// then on are the next manager's to notice.
	left atomic.Bool
}

var bucket = []byte("boxes")

// Errors a box operation may return.
var (
	ErrNotFound     = fmt.Errorf("no such box: %w", errdefs.ErrNotFound)
	ErrExists       = fmt.Errorf("box already exists: %w", errdefs.ErrAlreadyExists)
	ErrInvalidState = fmt.Errorf("box is not in a state for this: %w", errdefs.ErrFailedPrecondition)
)

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidateName checks a box name: 1 to 63 of a-z, 0-9 and '-', not
// starting or ending with '-' (box names become hostnames).
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("box name %q: use 1 to 63 lowercase letters, digits and '-', not at either end: %w", name, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Open opens the manager of cfg.Root. Boxes recorded as running or paused
// are a previous boxd's that left them running (it was killed, or closed
// with LeaveRunning): their machines are adopted where their runner can
// (runner.Adopter), their agents dialled again. A box whose machine is
// gone, or whose runner cannot adopt it, is marked stopped with the
// reason in its note; its disk is kept and the next use boots it.
func Open(cfg Config) (*Manager, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	runners := map[string]runner.Runner{}
	for _, r := range cfg.Runners {
		runners[r.Name()] = r
	}
	if len(cfg.Runners) == 0 {
		return nil, fmt.Errorf("box: no runners given: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.DefaultRunner == "" {
		cfg.DefaultRunner = cfg.Runners[0].Name()
	}
	if runners[cfg.DefaultRunner] == nil {
		return nil, fmt.Errorf("box: default runner %q is not among the runners: %w", cfg.DefaultRunner, errdefs.ErrInvalidArgument)
	}
	for _, d := range []string{disksDir(cfg.Root), filepath.Join(cfg.Root, "boxes")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("box: %w", err)
		}
	}
	db, err := bolt.Open(filepath.Join(cfg.Root, "boxes.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("box: opening boxes.db (is another boxd daemon running on %s?): %w", cfg.Root, err)
	}
	m := &Manager{
		cfg: cfg, db: db, log: cfg.Logger, runners: runners,
		locks:    map[string]*sync.Mutex{},
		machines: map[string]runner.Machine{},
		clients:  map[string]*agent.Client{},
		held:     map[string]*agent.Client{},
	}
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucket)
		return err
	})
	for _, r := range cfg.Runners {
		if rs, ok := r.(runner.ResumeSparer); ok {
			rs.SetResumeSparesWanted(m.anyHibernated)
		}
	}
	var boxes []Box
	if err == nil {
		boxes, err = m.List()
	}
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("box: reading boxes.db: %w", err)
	}
	for _, bx := range boxes {
		if bx.State != StateRunning && bx.State != StatePaused {
			continue
		}
		if err := m.adopt(context.Background(), bx); err != nil {
			if errors.Is(err, runner.ErrMemoryNotRestored) && m.ownSnapshot(bx) {
				m.backToSnapshot(bx, err)
				continue
			}
			m.log.Warn("box: a box left running is stopped", "box", bx.Name, "err", err)
			bx.State, bx.Note = StateStopped, "boxd stopped while the box ran, and "+err.Error()+"; its disk is kept, the next use boots it"
			if err := m.put(bx); err != nil {
				_ = db.Close()
				return nil, fmt.Errorf("box: %w", err)
			}
		}
	}
	return m, nil
}

// machineFile names the file that says which machine (its Machine.ID on
// the box's runner) box name runs in, for the next boxd to adopt it.
func (m *Manager) machineFile(name string) string { return filepath.Join(m.boxDir(name), "machine") }

// adopt takes over the machine a previous boxd left bx running in, dials
// its agent again and starts its spares. Processes in the box run on;
// sessions served over the old agent connection (an SSH session, an exec)
// are gone.
func (m *Manager) adopt(ctx context.Context, bx Box) error {
	b, err := os.ReadFile(m.machineFile(bx.Name))
	if err != nil {
		return errors.New("no machine of it is known")
	}
	id := strings.TrimSpace(string(b))
	r, err := m.runnerOf(bx)
	if err != nil {
		return err
	}
	ad, ok := r.(runner.Adopter)
	if !ok {
		return fmt.Errorf("the %s runner cannot adopt its machine", r.Name())
	}
	mach, err := ad.Adopt(ctx, id)
	if err != nil {
		_ = os.Remove(m.machineFile(bx.Name))
		if errors.Is(err, errdefs.ErrNotFound) {
			return fmt.Errorf("its machine ended meanwhile (%w)", err)
		}
		return fmt.Errorf("its machine could not be adopted (%w)", err)
	}
	// The old boxd may have left it stopped half-way through a snapshot;
	// the agent answers only while the guest runs.
	if err := mach.Continue(ctx); err != nil {
		_ = mach.Stop(ctx)
		return fmt.Errorf("its adopted machine does not run (%w)", err)
	}
	if err := m.attach(ctx, bx.Name, mach, false); err != nil {
		return fmt.Errorf("its adopted machine did not answer (%w)", err)
	}
	if bx.State == StatePaused {
		if err := mach.Pause(ctx); err != nil {
			m.stopMachine(ctx, bx.Name)
			return fmt.Errorf("its adopted machine did not pause (%w)", err)
		}
	}
	m.startSpares(bx.Name, mach)
	m.log.Info("box: adopted a box left running", "box", bx.Name, "machine", id)
	m.emit(events.Event{Type: events.Adopted, Box: bx.Name})
	return nil
}

func disksDir(root string) string { return filepath.Join(root, "disks") }

// LeaveRunning closes the manager and leaves its running and paused boxes
// as they are, for the next boxd on the root to adopt (see Open): an
// upgrade of boxd that no box notices but for its SSH sessions and execs,
// which end. Snapshots written in the background go to the store first.
func (m *Manager) LeaveRunning(ctx context.Context) error {
	if err := m.Flush(ctx); err != nil {
		m.log.Error("box: writing snapshots at exit", "err", err)
	}
	m.left.Store(true)
	m.mu.Lock()
	for name, c := range m.clients {
		_ = c.Close()
		delete(m.clients, name)
	}
	for name, c := range m.held {
		_ = c.Close()
		delete(m.held, name)
	}
	m.mu.Unlock()
	return m.db.Close()
}

// Close hibernates every running box (so that nothing is lost) and
// closes the database.
func (m *Manager) Close(ctx context.Context) error {
	boxes, _ := m.List()
	for _, b := range boxes {
		if b.State == StateRunning || b.State == StatePaused {
			if _, err := m.hibernate(ctx, b.Name, events.ReasonShutdown); err != nil {
				m.log.Error("box: hibernating at exit", "box", b.Name, "err", err)
				m.stopMachine(ctx, b.Name)
			}
		}
	}
	// Snapshots written in the background go to the store before boxd ends.
	if err := m.Flush(ctx); err != nil {
		m.log.Error("box: writing snapshots at exit", "err", err)
	}
	for _, b := range boxes {
		m.dropHeld(b.Name)
	}
	return m.db.Close()
}

func (m *Manager) lock(name string) func() {
	m.mu.Lock()
	l := m.locks[name]
	if l == nil {
		l = &sync.Mutex{}
		m.locks[name] = l
	}
	m.mu.Unlock()
	l.Lock()
	return l.Unlock
}

// Get returns box name.
func (m *Manager) Get(name string) (Box, error) {
	var bx Box
	err := m.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucket).Get([]byte(name))
		if v == nil {
			return fmt.Errorf("%q: %w", name, ErrNotFound)
		}
		return json.Unmarshal(v, &bx)
	})
	m.fill(&bx)
	return bx, err
}

// fill completes a record written before boxes named their runner: such a
// box runs on the default runner.
func (m *Manager) fill(bx *Box) {
	if bx.Runner == "" && bx.Name != "" {
		bx.Runner = m.cfg.DefaultRunner
	}
}

// List returns every box, by name.
func (m *Manager) List() ([]Box, error) {
	var out []Box
	err := m.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucket).ForEach(func(_, v []byte) error {
			var bx Box
			if err := json.Unmarshal(v, &bx); err != nil {
				return err
			}
			m.fill(&bx)
			out = append(out, bx)
			return nil
		})
	})
	return out, err
}

func (m *Manager) put(bx Box) error {
	v, err := json.Marshal(bx)
	if err != nil {
		return err
	}
	return m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Put([]byte(bx.Name), v) })
}

// CreateOptions describe a new box.
type CreateOptions struct {
	Name   string
	Image  string // default guest.DefaultImage
	Memory int64  // bytes, default DefaultMemory
	CPUs   int
	Keys   []string
	// Runner names the runner: RunnerAuto ("" too) or a runner's name.
	Runner string
	// NoInside keeps the box command inside the box from forking it or
	// acting on its forks (see Box.Inside).
	NoInside bool
	// MaxForks bounds the forks the box command inside may make; 0 means
	// DefaultMaxForks.
	MaxForks int
	// Owner is the new box's Owner.
	Owner string
	// HostPorts are the box's HostPorts.
	HostPorts []uint16
	// BaseSnapshot makes the box's disk from a snapshot of the store with
	// a disk map that is not an image (a root file system containerd's
	// snapshotter committed); it excludes Image.
	BaseSnapshot string
	// Labels are the box's Labels.
	Labels map[string]string
}

// Create makes box opts.Name from its image and boots it; it returns once
// the box's agent answers. If the box does not come up, nothing of it is
// kept.
func (m *Manager) Create(ctx context.Context, opts CreateOptions) (Box, error) {
	began := time.Now()
	if err := ValidateName(opts.Name); err != nil {
		return Box{}, err
	}
	if opts.Image == "" && opts.BaseSnapshot == "" {
		opts.Image = guest.DefaultImage
	}
	if opts.Image != "" && opts.BaseSnapshot != "" {
		return Box{}, fmt.Errorf("a box starts from an image or from a snapshot's root file system, not both: %w", errdefs.ErrInvalidArgument)
	}
	if opts.Memory == 0 {
		opts.Memory = DefaultMemory
	}
	if opts.Memory < 128<<20 || opts.Memory%(1<<20) != 0 {
		return Box{}, fmt.Errorf("memory %d: want a whole number of MiB, at least 128 MiB: %w", opts.Memory, errdefs.ErrInvalidArgument)
	}
	if total, err := procstat.MemTotal(); err == nil && opts.Memory > total {
		return Box{}, fmt.Errorf("memory %d MiB: more than this host's %d MiB of RAM: %w", opts.Memory>>20, total>>20, errdefs.ErrInvalidArgument)
	}
	if opts.CPUs == 0 {
		opts.CPUs = DefaultCPUs
	}
	if opts.MaxForks < 0 || opts.MaxForks > MaxMaxForks {
		return Box{}, fmt.Errorf("max forks %d: want 1 to %d: %w", opts.MaxForks, MaxMaxForks, errdefs.ErrInvalidArgument)
	}
	if opts.CPUs < 1 || opts.CPUs > 64 {
		return Box{}, fmt.Errorf("%d vCPUs: want 1 to 64: %w", opts.CPUs, errdefs.ErrInvalidArgument)
	}
	hostPorts, err := CheckHostPorts(opts.HostPorts)
	if err != nil {
		return Box{}, err
	}
	r, err := m.ChooseRunner(opts.Runner)
	if err != nil {
		return Box{}, err
	}
	if err := m.admit("box "+opts.Name, bootNeed(opts.Memory)); err != nil {
		return Box{}, err
	}
	unlock := m.lock(opts.Name)
	defer unlock()
	if _, err := m.Get(opts.Name); err == nil {
		return Box{}, fmt.Errorf("%q: %w", opts.Name, ErrExists)
	}
	base, err := m.baseFile(ctx, opts.Image, opts.BaseSnapshot)
	if err != nil {
		return Box{}, err
	}
	bx := Box{
		Name: opts.Name, State: StateStopped, Image: opts.Image, Memory: opts.Memory, CPUs: opts.CPUs,
		Runner: r.Name(), Keys: opts.Keys, Disk: m.newDiskPath(opts.Name), Created: time.Now().UTC(),
		Inside: !opts.NoInside, MaxForks: opts.MaxForks, Owner: opts.Owner, HostPorts: hostPorts,
		BaseSnapshot: opts.BaseSnapshot, Labels: opts.Labels,
	}
	if bx.MaxForks == 0 {
		bx.MaxForks = DefaultMaxForks
	}
	if err := os.MkdirAll(m.boxDir(bx.Name), 0o700); err != nil {
		return Box{}, fmt.Errorf("box: %w", err)
	}
	// The record first: a disk file without a box is collected (collect).
	if err := m.put(bx); err != nil {
		return Box{}, err
	}
	if err := r.(runner.DiskFiles).CreateDisk(ctx, bx.Disk, base); err != nil {
		_ = m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(bx.Name)) })
		return Box{}, err
	}
	bx, err = m.boot(ctx, bx)
	if err == nil {
		// Its own machine-id (the image has none), entropy and clock.
		var u agent.Unique
		if u, err = agent.NewUnique(bx.Name); err == nil {
			_, c, _ := m.machine(bx.Name)
			err = c.Unique(ctx, u)
		}
	}
	if err != nil {
		// A box that never came up is not kept: no record, disk or machine.
		m.discard(bx)
		return Box{}, fmt.Errorf("box %s: %w", bx.Name, err)
	}
	m.emit(events.Event{Type: events.Created, Box: bx.Name, Took: time.Since(began)})
	return bx, nil
}

// baseFile is the raw file a new box's disk stands on: image's, or
// snapshot's when image is empty.
func (m *Manager) baseFile(ctx context.Context, image, snapshot string) (string, error) {
	if image != "" {
		return guest.BaseFile(ctx, m.cfg.Graph, image, guest.BaseDir(m.cfg.Root)) // it says how to build a missing image
	}
	if _, err := m.cfg.Graph.Get(snapshot); err != nil {
		return "", fmt.Errorf("root file system %s: %w", snapshot, err)
	}
	path, err := guest.SnapshotBaseFile(ctx, m.cfg.Graph, snapshot, guest.BaseDir(m.cfg.Root))
	if err != nil {
		return "", fmt.Errorf("root file system %s: %w", snapshot, err)
	}
	return path, nil
}

// emit publishes e to Config.Events.
func (m *Manager) emit(e events.Event) { m.cfg.Events.Publish(e) }

func (m *Manager) boxDir(name string) string { return filepath.Join(m.cfg.Root, "boxes", name) }

// consolePath is the file box name's console is appended to.
func (m *Manager) consolePath(name string) string {
	return filepath.Join(m.boxDir(name), "console.log")
}

// Console files are trimmed to their last ConsoleKeep bytes (at a line
// start) when a machine of the box starts and the file is over ConsoleMax:
// a console kept across every boot and resume does not grow without end.
const (
	ConsoleMax  = 4 << 20
	ConsoleKeep = 1 << 20
)

// trimConsole trims box name's console file (no machine writes it now).
func (m *Manager) trimConsole(name string) {
	path := m.consolePath(name)
	st, err := os.Stat(path)
	if err != nil || st.Size() <= ConsoleMax {
		return
	}
	f, err := os.Open(path)
	if err != nil {
		return
	}
	tail := make([]byte, ConsoleKeep)
	n, err := f.ReadAt(tail, st.Size()-ConsoleKeep)
	f.Close()
	if err != nil && n != len(tail) {
		return
	}
	if i := bytes.IndexByte(tail, '\n'); i >= 0 {
		tail = tail[i+1:]
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, tail, 0o600); err != nil {
		_ = os.Remove(tmp)
		return
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return
	}
	m.log.Info("box: console trimmed", "box", name, "from_mib", st.Size()>>20, "kept_kib", len(tail)>>10)
}

// ConsolePath returns the file box name's console is appended to, across
// boots, restores and hibernations; it exists once the box has run. It
// takes no box lock: the machine only appends to the file, and Remove
// deletes it.
func (m *Manager) ConsolePath(name string) (string, error) {
	if _, err := m.Get(name); err != nil {
		return "", err
	}
	return m.consolePath(name), nil
}

func (m *Manager) newDiskPath(name string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return filepath.Join(disksDir(m.cfg.Root), fmt.Sprintf("%s-%s.disk", name, hex.EncodeToString(b[:])))
}

// spec is the machine a cold boot of bx starts.
func (m *Manager) spec(ctx context.Context, bx Box) (runner.Spec, error) {
	root := m.cfg.Root
	kernel, modules, err := guest.Kernel(ctx, root, m.cfg.Kernel)
	if err != nil {
		return runner.Spec{}, err
	}
	agentPath, err := guest.AgentPath()
	if err != nil {
		return runner.Spec{}, err
	}
	initrd, err := guest.Initramfs(ctx, root, modules, agentPath)
	if err != nil {
		return runner.Spec{}, err
	}
	return runner.Spec{
		MemSize: bx.Memory, CPUs: bx.CPUs, Kernel: kernel, Initrd: initrd,
		Cmdline:   guest.Cmdline(bx.Name),
		Console:   m.consolePath(bx.Name),
		Disk:      &runner.Disk{Path: bx.Disk, Base: bx.diskBase()},
		HostPorts: bx.HostPorts,
	}, nil
}

// CheckHostPorts returns ports sorted without repeats, or why they cannot be
// a box's HostPorts.
func CheckHostPorts(ports []uint16) ([]uint16, error) {
	if len(ports) == 0 {
		return nil, nil
	}
	out := slices.Clone(ports)
	slices.Sort(out)
	out = slices.Compact(out)
	if out[0] == 0 {
		return nil, fmt.Errorf("host port 0: want 1 to 65535: %w", errdefs.ErrInvalidArgument)
	}
	return out, nil
}

// boot cold-boots bx from its disk and waits for its agent.
func (m *Manager) boot(ctx context.Context, bx Box) (Box, error) {
	r, err := m.runnerOf(bx)
	if err != nil {
		return bx, err
	}
	spec, err := m.spec(ctx, bx)
	if err != nil {
		return bx, err
	}
	m.trimConsole(bx.Name)
	mach, err := r.Start(ctx, spec)
	if err != nil {
		return bx, err
	}
	if err := m.attach(ctx, bx.Name, mach, true); err != nil {
		return bx, err
	}
	m.startSpares(bx.Name, mach)
	bx.State, bx.Note = StateRunning, ""
	return bx, m.put(bx)
}

// startSpares starts spares for forks of box name's machine, in the
// background, where its runner has them (runner.Forker).
func (m *Manager) startSpares(name string, mach runner.Machine) {
	f, ok := mach.(runner.Forker)
	n := m.cfg.Spares
	if n == 0 {
		n = DefaultSpares
	}
	if n < 0 || !ok {
		return
	}
	if m.startMoveSpares(name, mach, n) {
		return
	}
	go func() {
		if err := f.StartSpares(context.Background(), n); err != nil && mach.Err() == nil {
			m.log.Warn("box: no spares for forks", "box", name, "err", err)
		}
	}()
}

// attach waits for the agent of mach and makes it box name's machine. On
// failure the machine is stopped and the error carries the console's end.
// booting says mach has just started booting (agent.DialBooting).
func (m *Manager) attach(ctx context.Context, name string, mach runner.Machine, booting bool) error {
	m.usage.noteStart(name, mach, time.Now())
	ah, ok := mach.(runner.AgentHost)
	if !ok { // ChooseRunner refuses such runners; a backend that changed its mind
		_ = mach.Stop(context.WithoutCancel(ctx))
		return errcat.NotSupported("box %s: its machine has no agent to reach", name)
	}
	dctx, cancel := context.WithTimeout(ctx, ReadyTimeout)
	defer cancel()
	go func() { // a guest that dies ends the wait at once
		select {
		case <-mach.Done():
			cancel()
		case <-dctx.Done():
		}
	}()
	c := m.resumeHeld(dctx, name, ah)
	var err error
	switch {
	case c != nil:
	case booting:
		c, err = agent.DialBooting(dctx, ah.AgentSocket())
	default:
		c, err = agent.Dial(dctx, ah.AgentSocket())
	}
	if err != nil {
		_ = mach.Stop(context.WithoutCancel(ctx))
		why := "its agent did not answer within " + ReadyTimeout.String()
		if mach.Err() != nil && !errors.Is(mach.Err(), runner.ErrStopped) {
			why = "the machine stopped: " + mach.Err().Error()
		}
		return fmt.Errorf("box %s did not come up (%s); the console ends with:\n%s: %w", name, why, tail(mach.Console(), 12), errdefs.ErrUnavailable)
	}
	c.OnChannelBreak(func(socket string, err error) {
		m.log.Info("box: the agent link's channel broke; dialling the agent again", "box", name, "err", err)
	})
	m.mu.Lock()
	m.machines[name], m.clients[name] = mach, c
	m.mu.Unlock()
	// A boxd killed from here on leaves the machine running; the next one
	// adopts it by this file.
	if err := os.WriteFile(m.machineFile(name), []byte(mach.ID()+"\n"), 0o600); err != nil {
		m.log.Warn("box: a later boxd cannot adopt this box's machine", "box", name, "err", err)
	}
	c.ServeHost(m.serveInside(name))
	go m.watch(name, mach)
	return nil
}

// watch marks box name stopped, saying why, when its machine exits
// other than on boxd's request (QEMU killed or crashed, the guest powered
// off): the box is reported as it is, not left running on paper. Its
// disk is kept; the next use boots it.
func (m *Manager) watch(name string, mach runner.Machine) {
	<-mach.Done()
	if errors.Is(mach.Err(), runner.ErrStopped) || m.left.Load() {
		return // the next manager on the root sees that the machine ended
	}
	unlock := m.lock(name)
	defer unlock()
	m.mu.Lock()
	current := m.machines[name] == mach
	m.mu.Unlock()
	if !current {
		return // an operation replaced or detached it meanwhile
	}
	m.detach(name)
	bx, err := m.Get(name)
	if err != nil || (bx.State != StateRunning && bx.State != StatePaused) {
		return
	}
	if errors.Is(mach.Err(), runner.ErrMemoryNotRestored) && m.ownSnapshot(bx) {
		m.backToSnapshot(bx, mach.Err())
		return
	}
	bx.State, bx.Note = StateStopped, "its machine exited: "+mach.Err().Error()+"; its disk is kept, the next use boots it"
	if err := m.put(bx); err != nil {
		m.log.Error("box: recording a machine that exited", "box", name, "err", err)
		return
	}
	m.emit(events.Event{Type: events.Stopped, Box: name, Reason: "its machine exited: " + mach.Err().Error()})
	m.log.Warn("box: machine exited", "box", name, "err", mach.Err())
}

// ownSnapshot says whether bx.Snapshot is a snapshot of bx itself (its
// hibernation), not the one it was made from, which it would resume from
// as its parent's twin.
func (m *Manager) ownSnapshot(bx Box) bool {
	if bx.Snapshot == "" {
		return false
	}
	s, err := m.cfg.Graph.Get(bx.Snapshot)
	return err == nil && s.Labels[LabelBox] == bx.Name
}

// backToSnapshot records that box bx's machine, restored from bx.Snapshot,
// ended before its memory was back (err): the box is hibernated in that
// snapshot again, which lost nothing, and the next use resumes it from there.
func (m *Manager) backToSnapshot(bx Box, err error) {
	bx.State, bx.Note = StateHibernated, "its machine ended before its memory was restored: "+err.Error()+"; it is hibernated in snapshot "+bx.Snapshot+" again"
	if perr := m.put(bx); perr != nil {
		m.log.Error("box: recording a machine that ended while restoring", "box", bx.Name, "err", perr)
		return
	}
	m.emit(events.Event{Type: events.Hibernated, Box: bx.Name, Snapshot: bx.Snapshot, Reason: "its machine ended before its memory was restored: " + err.Error()})
	m.log.Warn("box: machine ended while restoring its memory", "box", bx.Name, "snapshot", bx.Snapshot, "err", err)
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	lines := bytes.Split(bytes.TrimRight(b, "\r\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

func (m *Manager) detach(name string) runner.Machine {
	m.mu.Lock()
	defer m.mu.Unlock()
	mach := m.machines[name]
	if c := m.clients[name]; c != nil {
		_ = c.Close()
	}
	if mach != nil {
		_ = os.Remove(m.machineFile(name))
	}
	delete(m.machines, name)
	delete(m.clients, name)
	return mach
}

func (m *Manager) stopMachine(ctx context.Context, name string) {
	if mach := m.detach(name); mach != nil {
		_ = mach.Stop(ctx)
	}
}

// CPUTime is the CPU time (user and system) box name's machine has used
// so far, if it runs on a runner that measures it (runner.CPUMeter).
func (m *Manager) CPUTime(name string) (time.Duration, bool) {
	mach, _, ok := m.machine(name)
	if !ok {
		return 0, false
	}
	cm, ok := mach.(runner.CPUMeter)
	if !ok {
		return 0, false
	}
	d, err := cm.CPUTime()
	return d, err == nil
}

// machine returns box name's running machine, noticing one that died.
func (m *Manager) machine(name string) (runner.Machine, *agent.Client, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	mach := m.machines[name]
	if mach == nil {
		return nil, nil, false
	}
	select {
	case <-mach.Done():
		return mach, nil, false
	default:
	}
	return mach, m.clients[name], true
}

// Client returns an agent client of box name, resuming a hibernated box
// or starting a stopped one first. The client belongs to the manager.
func (m *Manager) Client(ctx context.Context, name string) (*agent.Client, error) {
	return m.client(ctx, name, events.ReasonUsed)
}

// client is Client; the events of a box it wakes give why.
func (m *Manager) client(ctx context.Context, name, why string) (*agent.Client, error) {
	began := time.Now()
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return nil, err
	}
	if _, c, ok := m.machine(name); ok && bx.State == StateRunning {
		return c, nil
	}
	if _, _, ok := m.machine(name); ok && bx.State == StatePaused {
		if _, err := m.setPausedLocked(ctx, bx, false); err != nil {
			return nil, err
		}
		m.emit(events.Event{Type: events.Unpaused, Box: name, Reason: why})
		_, c, _ := m.machine(name)
		return c, nil
	}
	ev := events.Event{Type: events.Started, Box: name, Reason: why}
	switch bx.State {
	case StateHibernated:
		ev.Type, ev.Snapshot = events.Resumed, bx.Snapshot
		bx, err = m.resume(ctx, bx)
	default:
		if mach := m.detach(name); mach != nil && mach.Err() != nil {
			bx.Note = "its machine stopped: " + mach.Err().Error()
		}
		if err = m.admit("booting box "+bx.Name, bootNeed(bx.Memory)); err == nil {
			bx, err = m.boot(ctx, bx)
		}
	}
	if err != nil {
		return nil, err
	}
	ev.Took = time.Since(began)
	m.emit(ev)
	_, c, _ := m.machine(bx.Name)
	return c, nil
}

// Exec runs cmd in box name and returns its exit code.
func (m *Manager) Exec(ctx context.Context, name string, cmd agent.Command) (int, error) {
	c, err := m.Client(ctx, name)
	if err != nil {
		return 0, err
	}
	return c.Run(ctx, cmd)
}

// Start boots a stopped box (or resumes a hibernated one).
func (m *Manager) Start(ctx context.Context, name string) (Box, error) {
	if _, err := m.client(ctx, name, events.ReasonRequested); err != nil {
		return Box{}, err
	}
	return m.Get(name)
}

// Stop shuts box name's machine down; its disk is kept.
func (m *Manager) Stop(ctx context.Context, name string) (Box, error) {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return Box{}, err
	}
	if bx.State == StateHibernated {
		return bx, fmt.Errorf("box %s is hibernated; resume it first or remove it: %w", name, ErrInvalidState)
	}
	was := bx.State
	m.stopMachine(ctx, name)
	bx.State = StateStopped
	if err := m.put(bx); err != nil {
		return bx, err
	}
	if was != StateStopped {
		m.emit(events.Event{Type: events.Stopped, Box: name, Reason: events.ReasonRequested})
	}
	return bx, nil
}

// Remove stops box name and deletes it: its record, its console, and its
// snapshots and disk overlays that no other box needs (see collect).
// Snapshots and overlays other boxes came from stay.
func (m *Manager) Remove(ctx context.Context, name string) error {
	unlock := m.lock(name)
	defer unlock()
	if _, err := m.Get(name); err != nil {
		return err
	}
	m.stopMachine(ctx, name)
	m.dropHeld(name)
	if err := m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucket).Delete([]byte(name)) }); err != nil {
		return err
	}
	_ = os.RemoveAll(m.boxDir(name))
	m.emit(events.Event{Type: events.Removed, Box: name})
	m.collect(ctx)
	if !m.anyHibernated() {
		for _, r := range m.cfg.Runners {
			if rs, ok := r.(runner.ResumeSparer); ok {
				rs.DropResumeSpares() // no box left to resume
			}
		}
	}
	return nil
}

// warmResume has bx's runner ready a machine for bx's resume, if it keeps
// such spares (runner.ResumeSparer).
func (m *Manager) warmResume(bx Box) {
	r, err := m.runnerOf(bx)
	if err != nil {
		return
	}
	if rs, ok := r.(runner.ResumeSparer); ok {
		rs.WarmResume(bx.Snapshot, bx.HostPorts)
	}
}

// anyHibernated says whether a box is hibernated: a resume may come.
func (m *Manager) anyHibernated() bool {
	boxes, err := m.List()
	if err != nil {
		return true
	}
	for _, bx := range boxes {
		if bx.State == StateHibernated {
			return true
		}
	}
	return false
}

// snapName names a box's next snapshot.
func snapName(bx *Box, what string) string {
	bx.Snaps++
	return fmt.Sprintf("box.%s.%d-%s", bx.Name, bx.Snaps, what)
}

func nowUTC() time.Time { return time.Now().UTC() }

// SetLabel sets label key of box name to value, or removes it when value
// is empty.
func (m *Manager) SetLabel(name, key, value string) error {
	unlock := m.lock(name)
	defer unlock()
	bx, err := m.Get(name)
	if err != nil {
		return err
	}
	if value == "" {
		delete(bx.Labels, key)
	} else {
		if bx.Labels == nil {
			bx.Labels = map[string]string{}
		}
		bx.Labels[key] = value
	}
	return m.put(bx)
}
