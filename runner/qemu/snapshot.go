package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Labels and maps of a QEMU snapshot.
const (
	LabelSpec  = "boxd.qemu.spec"
	LabelDisk  = "boxd.qemu.disk" // the frozen qcow2 overlay that holds the disk as it was
	DevicesMap = "devices"        // QEMU's device state, guest RAM left out
)

// Snapshot saves the machine into Runner.Graph as snapshot name, a delta
// against the machine's previous snapshot (or the one it was restored
// from, or its base image): device state, the memory pages written since
// (all pages that hold data when not incremental) and the disk blocks
// written since. The machine is stopped for it and goes on after, unless
// it was paused.
func (m *Machine) Snapshot(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	return m.snapshot(ctx, name, opts, modeSnapshot)
}

// SnapshotForFork is Snapshot for forks: the snapshot gets a frozen memory file of
// its own, the one StartSpares prepared (else one made now), filled with the
// machine's memory while it is stopped; restores of the snapshot map it
// copy-on-write at once, and take the spares that StartSpares started on it. The
// machine goes on, on its own memory. The snapshot goes to the store after
// SnapshotForFork returns (Committed waits for it); a machine whose disk is raw
// stores it first, and its restores rebuild memory from the store.
func (m *Machine) SnapshotForFork(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	return m.snapshot(ctx, name, opts, modeFork)
}

// snapMode says what happens to a machine around its snapshot.
type snapMode int

const (
	modeSnapshot snapMode = iota // it goes on
	modeFreeze                   // QEMU ends; a memory file of its own becomes the snapshot's
	modeFork                     // it goes on; a new frozen file holds the snapshot's memory
)

// Freeze is Snapshot, after which QEMU ends. The memory file of a machine
// on its own becomes the snapshot's frozen memory, which restores of the
// snapshot map copy-on-write at once, and the snapshot goes to the store
// after Freeze returns; a fork (private memory) stores it first. The file
// goes once its snapshot is in the store and, after dropFrozen or the last
// machine mapping it stopping, nothing maps it. Spares wait for SnapshotForFork, not
// Freeze.
func (m *Machine) Freeze(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	return m.snapshot(ctx, name, opts, modeFreeze)
}

// snapshot takes snapshot name in mode, in phases: beginSnapshot (checks,
// the parent, the disk's format), for a fork precopy (the memory copied
// while the guest runs), the stop, freezeDisk (the qcow2 top frozen under a
// new one), saveState (device state, the capture job), and one of three
// ends: finishFork (the prepared file caught up and adopted; the store
// write goes on in the background), finishFreezeLater (QEMU ends and its
// memory file becomes the snapshot's, written in the background), or
// captureNow followed by continuing (a snapshot) or finishFreeze (a freeze
// stored before it returns).
func (m *Machine) snapshot(ctx context.Context, name string, opts runner.SnapshotOptions, mode snapMode) (snapshotter.Snapshot, error) {
	if m.r.Graph == nil {
		return snapshotter.Snapshot{}, errcat.NotSupported("qemu: snapshots need Runner.Graph")
	}
	if err := snapshotter.ValidateName(name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	if err := m.awaitMemory(ctx); err != nil {
		return snapshotter.Snapshot{}, err
	}
	m.snapMu.Lock()
	defer m.snapMu.Unlock()
	if err := m.stopFlatten(ctx); err != nil {
		return snapshotter.Snapshot{}, err
	}
	if mode != modeFreeze {
		// It goes on with a layer more.
		defer m.flattenLater(0)
	}
	// The disk's top and the previous snapshot change: a later boxd
	// adopting the machine must see them (adopt.go).
	defer func() { _ = m.saveState() }()
	s, err := m.beginSnapshot(ctx, name, opts, mode)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	if s.mode == modeFork {
		if gaps, ok := s.live(); ok {
			return s.forkLive(gaps)
		}
	}
	if s.mode == modeFork {
		if err := s.precopy(); err != nil {
			return snapshotter.Snapshot{}, err
		}
		defer s.dropPrepared()
	}
	if err := m.command(ctx, "stop"); err != nil {
		return snapshotter.Snapshot{}, err
	}
	s.ph.mark("stop")
	if err := s.freezeDisk(); err != nil {
		s.resume()
		return snapshotter.Snapshot{}, err
	}
	if err := s.saveState(); err != nil {
		s.resume()
		return snapshotter.Snapshot{}, err
	}
	switch {
	case s.mode == modeFork:
		return s.finishFork()
	case s.mode == modeFreeze && !m.private && s.job.rawDisk == "":
		return s.finishFreezeLater(), nil
	}
	snap, err := s.captureNow()
	if err != nil {
		s.resume()
		return snapshotter.Snapshot{}, err
	}
	if s.mode == modeFreeze {
		return s.finishFreeze(snap), nil
	}
	s.resume()
	s.ph.mark("cont")
	m.r.logger().Debug("qemu: snapshot", s.ph.log("id", m.id, "name", name)...)
	return snap, nil
}

// snapRun is one snapshot of a machine on its way through the phases of
// Machine.snapshot, which holds the machine's snapMu throughout.
type snapRun struct {
	m            *Machine
	ctx          context.Context
	name, parent string
	opts         runner.SnapshotOptions
	mode         snapMode
	qcow2        bool // the machine's disk is a qcow2 overlay chain
	wasRunning   bool
	prep         string // a fork's prepared memory file, until the snapshot owns it
	filled       bool   // prep holds the stopped machine's memory (forkLive)
	frozenDisk   string // the overlay this snapshot froze
	job          *captureJob
	ph           *phases
}

// beginSnapshot checks that name is free and the parent (the machine's
// previous snapshot, or the one its disk starts from) is in the store, and
// finds the disk's format and whether the guest runs. A fork of a machine
// on a raw disk becomes a plain snapshot: its restores rebuild memory from
// the store.
func (m *Machine) beginSnapshot(ctx context.Context, name string, opts runner.SnapshotOptions, mode snapMode) (*snapRun, error) {
	if _, err := m.r.Graph.Get(name); err == nil || m.r.isPending(name) {
		return nil, fmt.Errorf("snapshot %q already exists: %w", name, errdefs.ErrAlreadyExists)
	}
	s := &snapRun{m: m, ctx: ctx, name: name, parent: m.last, opts: opts, mode: mode}
	if s.parent == "" {
		s.parent = m.base
	}
	// A delta needs its parent in the store.
	if err := m.r.committed(ctx, s.parent); err != nil {
		return nil, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	if m.disk != "" {
		format, err := diskFormat(m.disk)
		if err != nil {
			return nil, err
		}
		s.qcow2 = format == "qcow2"
		if s.qcow2 && s.parent == "" {
			return nil, fmt.Errorf("qemu: a snapshot of a qcow2 disk needs the snapshot it starts from (Spec.Disk.Base): %w", errdefs.ErrInvalidArgument)
		}
	}
	st, err := m.Status(ctx)
	if err != nil {
		return nil, err
	}
	s.wasRunning = st == "running"
	s.ph = startPhases()
	if s.mode == modeFork && m.disk != "" && !s.qcow2 {
		s.mode = modeSnapshot
	}
	return s, nil
}

// precopy takes the memory file of the fork's snapshot (the one
// StartSpares prepared, or a new one) and copies the machine's memory
// into it while the guest still runs.
func (s *snapRun) precopy() error {
	m := s.m
	prep, err := m.takePrepared()
	if err == nil {
		if err = m.precopy(prep); err != nil {
			m.forkDone(prep, false)
		}
	}
	if err != nil {
		return fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	s.prep = prep
	s.ph.mark("precopy")
	return nil
}

// live says whether the fork copies the machine's memory with a live
// migration (livecopy.go), and the holes of its memory file then: a
// running machine, of a runner with Runner.LiveForks whose QEMU tracks
// dirty pages soundly (liveTracked), on a frozen file
// (whose pages a snapshot migration sends anyway), or on its own file with
// few holes (the copy fills them, and they are given back while the guest
// is stopped).
func (s *snapRun) live() ([][2]int64, bool) {
	m := s.m
	if !s.wasRunning || !m.r.LiveForks || !m.liveTracked() {
		return nil, false
	}
	gaps, holes, err := memoryHoles(m.memFile, m.spec.MemSize)
	if err != nil {
		return nil, false
	}
	return gaps, m.private || holes*liveHoles <= m.spec.MemSize/migrationPage
}

// forkLive is the fork of a machine that live says copies live: its memory
// goes into the prepared file by liveCopy, which stops the guest itself,
// and the disk is frozen at that stop.
func (s *snapRun) forkLive(gaps [][2]int64) (snapshotter.Snapshot, error) {
	m := s.m
	prep, err := m.takePrepared()
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	s.prep = prep
	defer s.dropPrepared()
	devices, pages, err := m.liveCopy(s.ctx, prep, gaps, func() error {
		s.ph.mark("precopy")
		return s.freezeDisk()
	})
	if err != nil {
		s.resume()
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	s.ph.mark("memory")
	s.ph.attrs = append(s.ph.attrs, "pages", pages)
	if err := s.describe(devices); err != nil {
		s.resume()
		return snapshotter.Snapshot{}, err
	}
	s.filled = true
	m.liveForks.Add(1)
	return s.finishFork()
}

// dropPrepared gives back the prepared file of a fork that failed:
// nothing maps it.
func (s *snapRun) dropPrepared() {
	if s.prep != "" {
		s.m.forkDone(s.prep, false)
	}
}

// resume lets a machine that ran before the snapshot run on; a failed
// snapshot or freeze goes on too.
func (s *snapRun) resume() {
	if !s.wasRunning {
		return
	}
	if err := s.m.command(context.WithoutCancel(s.ctx), "cont"); err != nil {
		s.m.r.logger().Error("qemu: the machine stays stopped after its snapshot", "id", s.m.id, "err", err)
	}
}

// freezeDisk freezes the top of a qcow2 disk's overlay chain under a new
// one, which takes the machine's writes from now on.
func (s *snapRun) freezeDisk() error {
	m := s.m
	if !s.qcow2 {
		s.ph.mark("disk")
		return nil
	}
	top := m.nextOverlay(s.name)
	if _, err := m.qmp.execute(s.ctx, "blockdev-snapshot-sync", map[string]any{
		"device": "disk0", "snapshot-file": top, "format": "qcow2", "mode": "absolute-paths",
	}); err != nil {
		return fmt.Errorf("qemu: %s: freezing the disk: %w", m.id, err)
	}
	s.frozenDisk, m.disk = m.disk, top
	if d := m.ownDisk.Load(); d != nil && *d == s.frozenDisk {
		// The snapshot holds it now; the new top is the machine's.
		m.ownDisk.Store(&top)
	}
	// Until a snapshot stores its blocks (this one, or the next if this
	// one fails), oldest first: the store must hold every block since the
	// parent.
	m.unstoredDisks = append(m.unstoredDisks, s.frozenDisk)
	s.ph.mark("disk")
	return nil
}

// saveState saves the device state and describes what the snapshot
// stores: the capture job.
func (s *snapRun) saveState() error {
	devices, err := s.m.saveDevices(s.ctx)
	if err != nil {
		return err
	}
	s.ph.mark("devices")
	return s.describe(devices)
}

// describe makes the capture job of the snapshot whose device state is
// devices.
func (s *snapRun) describe(devices []byte) error {
	m := s.m
	job, err := m.captureJob(s.name, s.parent, s.opts, devices, s.frozenDisk)
	if err != nil {
		return err
	}
	if s.qcow2 {
		job.frozenDisks = slices.Clone(m.unstoredDisks)
	}
	s.job = job
	return nil
}

// finishFork catches the prepared file up with the stopped guest's
// memory, makes it the snapshot's frozen file (written to the store in
// the background) and lets the machine run on.
func (s *snapRun) finishFork() (snapshotter.Snapshot, error) {
	m := s.m
	if !s.filled {
		if err := m.fillPrepared(s.prep); err != nil {
			s.resume()
			return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
		}
		s.ph.mark("memory")
	}
	s.job.memFile, s.job.pid = s.prep, 0
	m.r.adoptPending(s.job)
	m.forkDone(s.prep, true)
	s.prep = "" // the snapshot's now
	m.last, m.unstoredDisks = s.name, nil
	s.resume()
	s.ph.mark("cont")
	m.r.logger().Debug("qemu: fork", s.ph.log("id", m.id, "name", s.name, "capture", "after")...)
	return snapshotter.Snapshot{Name: s.name, Parent: s.parent, Labels: s.job.labels}, nil
}

// finishFreezeLater ends a machine on its own memory file: the file and
// the frozen disk no longer change, so they go to the store after the
// freeze returns, while forks run; QEMU, stopped, quits in the background
// too.
func (s *snapRun) finishFreezeLater() snapshotter.Snapshot {
	m := s.m
	m.frozen.Store(true)
	m.r.adoptPending(s.job)
	m.last = s.name
	top, qcow2 := m.disk, s.qcow2
	go func() {
		_ = m.Stop(context.WithoutCancel(s.ctx))
		if qcow2 {
			_ = os.Remove(top) // the empty overlay nobody will write
		}
	}()
	m.r.logger().Debug("qemu: freeze", s.ph.log("id", m.id, "name", s.name, "capture", "after")...)
	return snapshotter.Snapshot{Name: s.name, Parent: s.parent, Labels: s.job.labels}
}

// captureNow writes the snapshot to the store before it returns.
func (s *snapRun) captureNow() (snapshotter.Snapshot, error) {
	m := s.m
	snap, err := m.r.capture(s.ctx, s.job)
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	m.unstoredDisks = nil
	s.ph.mark("capture")
	m.last = s.name
	return snap, nil
}

// finishFreeze ends the machine after a freeze stored in the store; a
// machine on its own memory file leaves it as the snapshot's frozen file.
func (s *snapRun) finishFreeze(snap snapshotter.Snapshot) snapshotter.Snapshot {
	m := s.m
	if !m.private {
		m.frozen.Store(true)
		m.r.adopt(s.name, m.memFile)
	}
	_ = m.Stop(context.WithoutCancel(s.ctx))
	s.ph.mark("quit")
	if s.qcow2 {
		_ = os.Remove(m.disk) // the empty overlay nobody will write
	}
	m.r.logger().Debug("qemu: freeze", s.ph.log("id", m.id, "name", s.name)...)
	return snap
}

// nextOverlay names the overlay that takes the disk's writes after
// snapshot name: beside the current top, as ORIGIN@NAME.qcow2, where
// ORIGIN is the file name of the disk the machine was given (see
// Runner.DiskOrigin).
func (m *Machine) nextOverlay(name string) string {
	origin := filepath.Base(m.disk)
	if i := strings.Index(origin, "@"); i >= 0 {
		origin = origin[:i]
	}
	next := filepath.Join(filepath.Dir(m.disk), origin+"@"+name+".qcow2")
	// A snapshot that failed may have left its overlay under the name.
	for i := 2; next == m.disk || exists(next); i++ {
		next = filepath.Join(filepath.Dir(m.disk), fmt.Sprintf("%s@%s.%d.qcow2", origin, name, i))
	}
	return next
}

// captureJob is what one snapshot writes to the store: memory, device
// state and disk changes.
type captureJob struct {
	name, parent string
	incremental  bool // only the pages changed since parent (sums)
	labels       map[string]string
	devices      []byte
	frozenDisks  []string // frozen qcow2 overlays, oldest first, whose own blocks are stored
	rawDisk      string   // a raw disk, stored whole
	memFile      string
	memSize      int64
	pid          int // a running QEMU whose private mapping of memFile holds the memory; 0: memFile holds it
	sums         *pageSums
	retryMu      sync.Mutex      // one retry of a failed background write at a time
	writeAfter   <-chan struct{} // SnapshotOptions.WriteAfter
}

// captureJob describes snapshot name of the stopped machine.
func (m *Machine) captureJob(name, parent string, opts runner.SnapshotOptions, devices []byte, frozenDisk string) (*captureJob, error) {
	spec, err := json.Marshal(toStored(m.specLabel()))
	if err != nil {
		return nil, err
	}
	labels := map[string]string{runner.LabelRunner: m.r.Name(), LabelSpec: string(spec)}
	if frozenDisk != "" {
		labels[LabelDisk] = frozenDisk
	}
	maps.Copy(labels, opts.Labels)
	if m.sums == nil {
		m.sums = newPageSums(int(m.spec.MemSize / memstore.PageSize))
	}
	j := &captureJob{
		name: name, parent: parent, incremental: opts.Incremental && m.last != "",
		labels: labels, devices: devices,
		memFile: m.memFile, memSize: m.spec.MemSize, sums: m.sums, writeAfter: opts.WriteAfter,
	}
	if frozenDisk == "" {
		j.rawDisk = m.disk
	}
	if m.private {
		j.pid = m.PID()
	}
	return j, nil
}

// capture writes j to the store.
func (r *Runner) capture(ctx context.Context, j *captureJob) (snapshotter.Snapshot, error) {
	g := r.Graph
	// The pages that may have changed: those QEMU holds privately, for a
	// machine on a frozen file; those that hold data, for one on its own
	// (whose file holds its memory: it is read directly).
	var src io.ReaderAt
	var candidates memstore.Bitmap
	if j.pid != 0 {
		ram, err := findGuestRAM(j.pid, j.memFile, j.memSize)
		if err != nil {
			return snapshotter.Snapshot{}, err
		}
		f, mem, err := ram.open()
		if err != nil {
			return snapshotter.Snapshot{}, err
		}
		defer f.Close()
		if candidates, err = ram.private(); err != nil {
			return snapshotter.Snapshot{}, err
		}
		src = mem
	} else {
		f, err := os.Open(j.memFile)
		if err != nil {
			return snapshotter.Snapshot{}, fmt.Errorf("qemu: memory file: %w", err)
		}
		defer f.Close()
		if candidates, err = dataPages(j.memFile, j.memSize); err != nil {
			return snapshotter.Snapshot{}, err
		}
		src = f
	}
	changed, keepSums, err := j.sums.changed(src, candidates)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	var dirty memstore.Bitmap
	switch {
	case j.parent == "":
		// Every page is read; zero pages are not stored.
	case j.incremental:
		dirty = changed
	case !hasMemory(g, j.parent):
		// The parent is a disk image: the pages that hold data are all.
		dirty = candidates
	}
	copts := memstore.CaptureOptions{
		Name: j.name, Parent: j.parent, Dirty: dirty, Labels: j.labels,
		Blobs: map[string][]byte{DevicesMap: j.devices},
	}
	switch {
	case len(j.frozenDisks) > 0:
		copts.More = func(ctx context.Context, img *snapshotter.Draft) error {
			for _, d := range j.frozenDisks {
				if _, err := writeOverlay(ctx, img, d); err != nil {
					return err
				}
			}
			return nil
		}
	case j.rawDisk != "": // all of it
		copts.More = func(ctx context.Context, img *snapshotter.Draft) error {
			d, err := os.Open(j.rawDisk)
			if err != nil {
				return fmt.Errorf("qemu: disk: %w", err)
			}
			defer d.Close()
			_, err = img.WriteMap(ctx, DiskMap, snapshotter.KindDisk, d, nil)
			return err
		}
	}
	snap, err := memstore.Capture(ctx, g, src, j.memSize, copts)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	keepSums()
	return snap, nil
}

// specLabel is the spec a restore starts QEMU with: the machine's, less
// the per-machine disk and console.
func (m *Machine) specLabel() runner.Spec {
	s := m.spec
	s.Console = ""
	s.Disk = nil // a restore has a disk when the snapshot has a disk map
	s.HostPorts = nil
	return s
}

func hasMemory(g *snapshotter.Graph, snap string) bool {
	s, err := g.Get(snap)
	if err != nil {
		return false
	}
	_, ok := s.Map(memstore.DefaultMap)
	return ok
}

// saveDevices migrates the stopped machine's device state to boxd over a
// unix socket, guest RAM stripped out.
func (m *Machine) saveDevices(ctx context.Context) ([]byte, error) {
	if m.private {
		// The migration sends private RAM, reading every page of the
		// frozen file: the holes it fills go back afterwards.
		if gaps, _, err := memoryHoles(m.memFile, m.spec.MemSize); err == nil {
			defer func() { go m.punchFrozen(gaps) }()
		}
	}
	uri, got, stop, err := m.receiveMigration("save.sock", func(r io.Reader, w io.Writer) error {
		_, err := stripRAM(r, w)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer stop()
	if _, err := m.qmp.execute(ctx, "migrate", map[string]any{"uri": uri}); err != nil {
		return nil, fmt.Errorf("qemu: %s: saving device state: %w", m.id, err)
	}
	if err := m.waitMigration(ctx); err != nil {
		stop()
		m.cancelMigration()
		return nil, fmt.Errorf("qemu: %s: saving device state: %w", m.id, err)
	}
	select {
	case r := <-got:
		if r.err != nil {
			return nil, fmt.Errorf("qemu: %s: device state: %w", m.id, r.err)
		}
		return r.b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// migrationResult is what the reader of a migration stream made of it.
type migrationResult struct {
	b   []byte
	err error
}

// receiveMigration listens on the unix socket name in the machine's folder
// for one migration stream, which read turns into bytes in the
// background. It returns the URI for QEMU's migrate and stop, which closes
// the socket.
func (m *Machine) receiveMigration(name string, read func(r io.Reader, w io.Writer) error) (uri string, got <-chan migrationResult, stop func(), err error) {
	sock := filepath.Join(m.dir, name)
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return "", nil, nil, fmt.Errorf("qemu: %w", err)
	}
	ch := make(chan migrationResult, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			ch <- migrationResult{err: err}
			return
		}
		defer conn.Close()
		var buf bytes.Buffer
		err = read(conn, &buf)
		ch <- migrationResult{buf.Bytes(), err}
	}()
	return "unix:" + sock, ch, func() { _ = l.Close(); _ = os.Remove(sock) }, nil
}

// loadDevices feeds device state to a machine started with -incoming.
func (m *Machine) loadDevices(ctx context.Context, state []byte) error {
	sock := filepath.Join(m.dir, "load.sock")
	if _, err := m.qmp.execute(ctx, "migrate-incoming", map[string]any{"uri": "unix:" + sock}); err != nil {
		return fmt.Errorf("qemu: %s: loading device state: %w", m.id, err)
	}
	var conn net.Conn
	var err error
	for {
		var d net.Dialer
		if conn, err = d.DialContext(ctx, "unix", sock); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qemu: %s: loading device state: %w", m.id, err)
		case <-m.done:
			return m.exit
		case <-time.After(time.Millisecond):
		}
	}
	_, err = conn.Write(state)
	_ = conn.Close()
	if err != nil {
		return fmt.Errorf("qemu: %s: loading device state: %w", m.id, err)
	}
	if err := m.waitMigration(ctx); err != nil {
		return fmt.Errorf("qemu: %s: loading device state: %w; QEMU said: %s", m.id, err, m.said())
	}
	return nil
}

// cancelMigration cancels a migration that was given up on and waits
// (a few seconds at most) until it has ended, so that a cont after it
// lets the guest run rather than being undone by the migration finishing.
func (m *Machine) cancelMigration() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = m.qmp.execute(ctx, "migrate_cancel", nil)
	for ctx.Err() == nil && !m.stopped() {
		raw, err := m.qmp.execute(ctx, "query-migrate", nil)
		if err != nil {
			return
		}
		var st struct {
			Status string `json:"status"`
		}
		if json.Unmarshal(raw, &st) != nil {
			return
		}
		switch st.Status {
		case "completed", "failed", "cancelled", "none", "":
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// waitMigration polls query-migrate until the migration completes.
func (m *Machine) waitMigration(ctx context.Context) error {
	return m.awaitMigration(ctx, "completed", nil)
}

// awaitMigration polls query-migrate until the migration's status is want,
// calling each (when set) between polls; a migration that ends otherwise is
// an error.
func (m *Machine) awaitMigration(ctx context.Context, want string, each func() error) error {
	for {
		raw, err := m.qmp.execute(ctx, "query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return err
		}
		switch st.Status {
		case want:
			return nil
		case "failed", "cancelled", "completed":
			return errors.New("migration " + st.Status + ": " + st.ErrorDesc)
		}
		if each != nil {
			if err := each(); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-m.done:
			return m.exit
		case <-time.After(time.Millisecond):
		}
	}
}
