package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

// OptionBase is the Spec.Options key naming the snapshot whose disk map the disk
// starts from (the image a box's overlay is made over); a machine's first
// snapshot is a delta against it.
const OptionBase = "base"

// Labels and maps of a QEMU snapshot.
const (
	LabelRunner = "boxd.runner"
	LabelSpec   = "boxd.qemu.spec"
	LabelDisk   = "boxd.qemu.disk" // the frozen qcow2 overlay that holds the disk as it was
	DevicesMap  = "devices"        // QEMU's device state, guest RAM left out
)

// Snapshot saves the machine into Runner.Graph as snapshot name, a delta
// against the machine's previous snapshot (or the one it was restored
// from, or its base image): device state, the memory pages written since
// (all pages that hold data when not incremental) and the disk blocks
// written since. The machine is stopped for it and goes on after, unless
// it was paused.
func (m *Machine) Snapshot(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	return m.snapshot(ctx, name, opts, false)
}

// Freeze is Snapshot, after which QEMU ends and its memory file becomes
// the snapshot's frozen memory: restores of the snapshot map it
// copy-on-write at once, instead of rebuilding it from the store. A fork is
// Freeze and then one Restore for the parent and one per child. The file
// goes when the last machine mapping it stops (or DropFrozen, if none
// ever does).
func (m *Machine) Freeze(ctx context.Context, name string, opts runner.SnapshotOptions) (snapshotter.Snapshot, error) {
	return m.snapshot(ctx, name, opts, true)
}

func (m *Machine) snapshot(ctx context.Context, name string, opts runner.SnapshotOptions, freeze bool) (snapshotter.Snapshot, error) {
	g := m.r.Graph
	if g == nil {
		return snapshotter.Snapshot{}, fmt.Errorf("qemu: snapshots need Runner.Graph: %w", runner.ErrNotSupported)
	}
	if err := snapshotter.ValidateName(name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	m.snapMu.Lock()
	defer m.snapMu.Unlock()
	if _, err := g.Get(name); err == nil {
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot %q already exists: %w", name, cas.ErrAlreadyExists)
	}
	parent := m.last
	if parent == "" {
		parent = m.spec.Options[OptionBase]
	}
	qcow2 := false
	if m.disk != "" {
		format, err := diskFormat(m.disk)
		if err != nil {
			return snapshotter.Snapshot{}, err
		}
		qcow2 = format == "qcow2"
		if qcow2 && parent == "" {
			return snapshotter.Snapshot{}, fmt.Errorf("qemu: a snapshot of a qcow2 disk needs the snapshot it starts from (option %q): %w", OptionBase, cas.ErrInvalidArgument)
		}
	}
	st, err := m.Status(ctx)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	wasRunning := st == "running"
	if err := m.command(ctx, "stop"); err != nil {
		return snapshotter.Snapshot{}, err
	}
	resume := func() {
		if wasRunning && !freeze {
			_ = m.command(context.WithoutCancel(ctx), "cont")
		}
	}

	// The disk: freeze the top of the overlay chain under a new one.
	frozenDisk := ""
	if qcow2 {
		top := m.nextOverlay(name)
		if _, err := m.qmp.execute(ctx, "blockdev-snapshot-sync", map[string]any{
			"device": "disk0", "snapshot-file": top, "format": "qcow2", "mode": "absolute-paths",
		}); err != nil {
			resume()
			return snapshotter.Snapshot{}, fmt.Errorf("qemu: %s: freezing the disk: %w", m.id, err)
		}
		frozenDisk, m.disk = m.disk, top
		if d := m.ownDisk.Load(); d != nil && *d == frozenDisk {
			// The snapshot holds it now; the new top is the machine's.
			m.ownDisk.Store(&top)
		}
	}

	devices, err := m.saveDevices(ctx)
	if err != nil {
		resume()
		return snapshotter.Snapshot{}, err
	}

	snap, err := m.capture(ctx, name, parent, opts, devices, frozenDisk)
	if err != nil {
		resume()
		return snapshotter.Snapshot{}, fmt.Errorf("snapshot of %s: %w", m.id, err)
	}
	m.last = name
	if !freeze {
		resume()
		return snap, nil
	}
	if !m.private {
		m.frozen.Store(true)
		m.r.adopt(name, m.memFile)
	}
	_ = m.Stop(context.WithoutCancel(ctx))
	if qcow2 {
		_ = os.Remove(m.disk) // the empty overlay nobody will write
	}
	return snap, nil
}

// nextOverlay names the overlay that takes the disk's writes after
// snapshot name: beside the current top.
func (m *Machine) nextOverlay(name string) string {
	base := strings.TrimSuffix(filepath.Base(m.disk), ".qcow2")
	if i := strings.Index(base, "@"); i >= 0 {
		base = base[:i]
	}
	return filepath.Join(filepath.Dir(m.disk), base+"@"+name+".qcow2")
}

// capture writes the snapshot: memory, device state and disk changes.
func (m *Machine) capture(ctx context.Context, name, parent string, opts runner.SnapshotOptions, devices []byte, frozenDisk string) (snapshotter.Snapshot, error) {
	g := m.r.Graph
	ram, err := findGuestRAM(m.PID(), m.memFile, m.spec.MemSize)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	f, src, err := ram.open()
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	defer f.Close()
	// The pages that may have changed: those QEMU holds privately, for a
	// machine on a frozen file; those that hold data, for one on its own.
	var candidates memstore.Bitmap
	if m.private {
		candidates, err = ram.private()
	} else {
		candidates, err = dataPages(m.memFile, m.spec.MemSize)
	}
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	if m.sums == nil {
		m.sums = newPageSums(int(m.spec.MemSize / memstore.PageSize))
	}
	changed, err := m.sums.changed(src, candidates)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	var dirty memstore.Bitmap
	switch {
	case parent == "":
		// Every page is read; zero pages are not stored.
	case opts.Incremental && m.last != "":
		dirty = changed
	case !hasMemory(g, parent):
		// The parent is a disk image: the pages that hold data are all.
		dirty = candidates
	}
	spec, err := json.Marshal(m.specLabel())
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	labels := map[string]string{LabelRunner: "qemu", LabelSpec: string(spec)}
	if frozenDisk != "" {
		labels[LabelDisk] = frozenDisk
	}
	maps.Copy(labels, opts.Labels)
	copts := memstore.CaptureOptions{
		Name: name, Parent: parent, Dirty: dirty, Labels: labels,
		Blobs: map[string][]byte{DevicesMap: devices},
	}
	switch {
	case frozenDisk != "":
		copts.More = func(ctx context.Context, img *snapshotter.Image) error {
			_, err := writeOverlay(ctx, img, frozenDisk)
			return err
		}
	case m.disk != "": // a raw disk: all of it
		copts.More = func(ctx context.Context, img *snapshotter.Image) error {
			d, err := os.Open(m.disk)
			if err != nil {
				return fmt.Errorf("qemu: disk: %w", err)
			}
			defer d.Close()
			_, err = img.WriteMap(ctx, DiskMap, snapshotter.KindDisk, d, nil)
			return err
		}
	}
	return memstore.Capture(ctx, g, src, m.spec.MemSize, copts)
}

// specLabel is the spec a restore starts QEMU with: the machine's, less
// the per-machine disk and console.
func (m *Machine) specLabel() runner.Spec {
	s := m.spec
	s.Options = maps.Clone(s.Options)
	delete(s.Options, OptionConsole)
	delete(s.Options, OptionDisk) // a restore has a disk when the snapshot has a disk map
	delete(s.Options, OptionBase)
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
	sock := filepath.Join(m.dir, "save.sock")
	_ = os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	defer os.Remove(sock)
	defer l.Close()
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer conn.Close()
		var buf bytes.Buffer
		_, err = stripRAM(conn, &buf)
		got <- result{buf.Bytes(), err}
	}()
	if _, err := m.qmp.execute(ctx, "migrate", map[string]any{"uri": "unix:" + sock}); err != nil {
		return nil, fmt.Errorf("qemu: %s: saving device state: %w", m.id, err)
	}
	if err := m.waitMigration(ctx); err != nil {
		_ = l.Close()
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
		return fmt.Errorf("qemu: %s: loading device state: %w; QEMU said: %s", m.id, err, bytes.TrimSpace(m.output.Bytes()))
	}
	return nil
}

// waitMigration polls query-migrate until the migration completes.
func (m *Machine) waitMigration(ctx context.Context) error {
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
		case "completed":
			return nil
		case "failed", "cancelled":
			return errors.New("migration " + st.Status + ": " + st.ErrorDesc)
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
