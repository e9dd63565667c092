package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/runner"
)

// StartSpares starts n spares for forks of m. A spare is QEMU started ahead of
// time with m's machine, less its disk, paused and waiting for device
// state (-incoming defer), with a memory file mapped copy-on-write that m
// prepares for its next SnapshotForFork: an empty file, which SnapshotForFork
// fills with m's memory (for a fork of a fork too: a copy of the frozen file
// held ahead would cost host memory the size of the guest's, for every
// machine that may fork), and the restores of its snapshot take the
// spares instead of starting QEMU: they attach their disk and console and
// load the device state, which takes process start off a fork's critical
// path. A spare reads nothing of the file before it runs, so it sees what
// SnapshotForFork wrote.
//
// Spares go when m ends, and spares of a fork's snapshot when its frozen
// file is dropped.
func (m *Machine) StartSpares(ctx context.Context, n int) error {
	if m.stopped() {
		return m.exit
	}
	file, err := m.prepare()
	if err != nil || file == "" {
		return err
	}
	spec := m.specLabel()
	for range n {
		sp, err := m.r.launch(ctx, spec, launchOptions{memFile: file, incoming: true})
		if err != nil {
			return fmt.Errorf("qemu: a spare for %s: %w", m.id, err)
		}
		m.r.addSpare(file, sp)
		// What became of the file while the spare started decides whether
		// it stays: a fork in progress adopts its spares or stops them; an
		// adopted file keeps them until it goes; otherwise they go.
		m.prepMu.Lock()
		st, taken := m.prepState[file]
		ended := m.prepEnded
		m.prepMu.Unlock()
		switch {
		case taken && st == prepForking:
		case taken && st == prepAdopted:
			if !m.r.isFrozenFile(file) {
				m.r.stopSpares(file)
				return nil
			}
		case taken || ended:
			m.r.stopSpares(file)
			return nil
		}
	}
	return nil
}

// prepare makes the file m's spares map and its next SnapshotForFork fills (see
// StartSpares), or returns the one waiting; "" if the machine ended meanwhile.
func (m *Machine) prepare() (string, error) {
	m.prepMu.Lock()
	if m.prepared != "" {
		defer m.prepMu.Unlock()
		return m.prepared, nil
	}
	m.prepMu.Unlock()
	path, err := m.newPrepared()
	if err != nil {
		return "", err
	}
	m.prepMu.Lock()
	defer m.prepMu.Unlock()
	if m.prepared != "" || m.prepEnded {
		m.r.setPrepared(path, false) // another StartSpares's, or too late
		return m.prepared, nil
	}
	m.prepared = path
	return path, nil
}

// newPrepared makes an empty file for a fork's memory.
func (m *Machine) newPrepared() (string, error) {
	path := filepath.Join(m.r.memDir(), fmt.Sprintf("fork-%d-%d.mem", os.Getpid(), m.r.ids.Add(1)))
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("qemu: memory file: %w", err)
	}
	err = out.Truncate(m.spec.MemSize)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return "", err
	}
	m.r.setPrepared(path, true)
	return path, nil
}

// setPrepared records that path is a prepared memory file (in use until
// a fork adopts or drops it) or, with false, removes it.
func (r *Runner) setPrepared(path string, prepared bool) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	if prepared {
		if r.prepFiles == nil {
			r.prepFiles = map[string]bool{}
		}
		r.prepFiles[path] = true
		return
	}
	delete(r.prepFiles, path)
	_ = os.Remove(path)
}

// removeUnused removes the memory file of a spare that ended untaken if
// nothing uses it: neither a frozen file, nor a prepared one, nor the own
// file of a machine that runs. A spare
// whose file went before its QEMU opened it made it anew.
func (r *Runner) removeUnused(path string) {
	if r.ownedByLive(path) { // a spare of StartMoveSpares
		return
	}
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	if r.byPath[path] == nil && !r.prepFiles[path] {
		_ = os.Remove(path)
	}
}

// What became of a prepared file a fork took.
const (
	prepForking = iota + 1 // the fork is under way
	prepAdopted            // it is the fork snapshot's frozen file
	prepFailed             // the fork failed; the file is gone
)

// takePrepared hands the prepared file to a fork, or makes one now.
func (m *Machine) takePrepared() (string, error) {
	m.prepMu.Lock()
	p := m.prepared
	m.prepared = ""
	if p != "" {
		if m.prepState == nil {
			m.prepState = map[string]int{}
		}
		m.prepState[p] = prepForking
	}
	m.prepMu.Unlock()
	if p != "" {
		return p, nil
	}
	return m.newPrepared()
}

// forkDone records what became of the prepared file a fork took: adopted
// as its snapshot's frozen file, or, when the fork failed, removed with
// its spares.
func (m *Machine) forkDone(file string, adopted bool) {
	m.prepMu.Lock()
	if m.prepState == nil {
		m.prepState = map[string]int{}
	}
	if adopted {
		m.prepState[file] = prepAdopted
	} else {
		m.prepState[file] = prepFailed
	}
	m.prepMu.Unlock()
	if !adopted {
		m.r.stopSpares(file)
		m.r.setPrepared(file, false)
	}
}

// dropPrepared removes a prepared file no fork took, and its spares; a
// machine that ended prepares no other.
func (m *Machine) dropPrepared() {
	m.prepMu.Lock()
	p := m.prepared
	m.prepared, m.prepEnded = "", true
	m.prepMu.Unlock()
	if p != "" {
		m.r.stopSpares(p)
		m.r.setPrepared(p, false)
	}
}

// precopy copies the memory file a machine maps into file, made by
// newPrepared, while the guest runs: fillPrepared, with the guest stopped,
// then writes only the pages that changed meanwhile (a machine on its own
// file) or that the machine holds privately (a fork, on a frozen file).
func (m *Machine) precopy(file string) error {
	out, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("qemu: memory file: %w", err)
	}
	err = copySparse(m.memFile, out, m.spec.MemSize)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

// fillPrepared writes the stopped machine's memory into file, which
// precopy filled: the pages of its own memory file that changed since, or
// the pages a fork holds privately over the frozen file's copy.
func (m *Machine) fillPrepared(file string) error {
	if !m.private {
		_, err := catchUp(m.memFile, file, m.spec.MemSize)
		return err
	}
	return m.writePrivate(file)
}

// writePrivate writes the pages the stopped machine holds privately into
// file, a copy of the frozen file it maps (precopy): file then holds its
// memory.
func (m *Machine) writePrivate(file string) error {
	ram, err := findGuestRAM(m.PID(), m.memFile, m.spec.MemSize)
	if err != nil {
		return err
	}
	priv, err := ram.private()
	if err != nil {
		return err
	}
	mem, src, err := ram.open()
	if err != nil {
		return err
	}
	defer mem.Close()
	out, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("qemu: memory file: %w", err)
	}
	const run = 256
	buf := make([]byte, run*memstore.PageSize)
	pages := int(m.spec.MemSize / memstore.PageSize)
	for p := 0; p < pages; {
		if !priv.Has(p) {
			p++
			continue
		}
		n := 1
		for p+n < pages && n < run && priv.Has(p+n) {
			n++
		}
		b := buf[:n*memstore.PageSize]
		off := int64(p) * memstore.PageSize
		if _, err := src.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
			_ = out.Close()
			return fmt.Errorf("qemu: reading guest memory: %w", err)
		}
		if _, err := out.WriteAt(b, off); err != nil {
			_ = out.Close()
			return fmt.Errorf("qemu: memory file: %w", err)
		}
		p += n
	}
	return out.Close()
}

func (r *Runner) isFrozenFile(path string) bool {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	return r.byPath[path] != nil
}

// Spares is how many spares wait on the memory files m prepared for its
// forks (StartSpares).
func (m *Machine) Spares() int {
	m.prepMu.Lock()
	files := []string{m.prepared}
	for f := range m.prepState {
		files = append(files, f)
	}
	m.prepMu.Unlock()
	m.r.spareMu.Lock()
	defer m.r.spareMu.Unlock()
	n := 0
	for _, f := range files {
		n += len(m.r.spares[f])
	}
	return n
}

// takeSpare returns a spare waiting on memFile for a machine like spec,
// with the disk and console of spec attached, or nil if there is none. The
// spare then holds the reference on memFile the caller acquired.
func (r *Runner) takeSpare(ctx context.Context, memFile string, spec runner.Spec) (*Machine, error) {
	for {
		sp := r.popSpare(memFile, spec)
		if sp == nil {
			return nil, nil
		}
		sp.acquired.Store(true)
		if sp.stopped() {
			// It ended before it was taken. The caller's reference stays
			// the caller's: if the spare's exit gave it back, take it
			// again. Then try the next.
			if !sp.released.CompareAndSwap(false, true) && !r.reacquire(memFile) {
				return nil, fmt.Errorf("qemu: memory file %s is gone: %w", memFile, sp.Err())
			}
			continue
		}
		if err := sp.takeOver(ctx, spec); err != nil {
			r.logger().Warn("qemu: a spare could not take over; starting QEMU instead", "id", sp.id, "err", err)
			if !sp.released.CompareAndSwap(false, true) && !r.reacquire(memFile) {
				// It ended and gave back the caller's reference, and that
				// was the last.
				return nil, fmt.Errorf("qemu: memory file %s is gone: %w", memFile, err)
			}
			_ = sp.Stop(context.WithoutCancel(ctx))
			continue
		}
		r.logger().Debug("qemu: restore took a spare", "id", sp.id, "memory", memFile)
		return sp, nil
	}
}

func (r *Runner) popSpare(memFile string, spec runner.Spec) *Machine {
	r.spareMu.Lock()
	defer r.spareMu.Unlock()
	list := r.spares[memFile]
	for i, sp := range list {
		if sameMachine(sp.spec, spec) {
			r.spares[memFile] = append(list[:i:i], list[i+1:]...)
			return sp
		}
	}
	return nil
}

// sameMachine says whether a spare started with spare can take over a
// machine of spec: all but the disk and console are the same.
func sameMachine(spare, spec runner.Spec) bool {
	net := func(s runner.Spec) string {
		if s.Network == "" {
			return runner.NetworkUser
		}
		return s.Network
	}
	return spare.Kernel == spec.Kernel && spare.MemSize == spec.MemSize && max(spare.CPUs, 1) == max(spec.CPUs, 1) &&
		spare.Initrd == spec.Initrd && spare.Cmdline == spec.Cmdline && net(spare) == net(spec) &&
		cpuModel(spare) == cpuModel(spec) && layout(spare) == layout(spec) && slices.Equal(spare.HostPorts, spec.HostPorts)
}

// takeOver makes a spare the machine of spec: the console goes to spec's
// console file and spec's disk is plugged in where a machine started with
// it has it.
func (m *Machine) takeOver(ctx context.Context, spec runner.Spec) error {
	if c := spec.Console; c != "" {
		if _, err := m.qmp.execute(ctx, "chardev-change", map[string]any{
			"id":      "console",
			"backend": map[string]any{"type": "file", "data": map[string]any{"out": c, "append": true}},
		}); err != nil {
			return fmt.Errorf("qemu: %s: console to %s: %w", m.id, c, err)
		}
		m.consoleMu.Lock()
		m.console = c
		m.consoleMu.Unlock()
	}
	if disk := diskPath(spec); disk != "" {
		format, err := diskFormat(disk)
		if err != nil {
			return err
		}
		// drive_add (a human monitor command) names the block backend
		// disk0, as -drive does, so that snapshots find it the same way.
		raw, err := m.qmp.execute(ctx, "human-monitor-command", map[string]any{
			"command-line": "drive_add 0 " + driveOpts(disk, format),
		})
		if err != nil {
			return fmt.Errorf("qemu: %s: adding disk %s: %w", m.id, disk, err)
		}
		var out string
		_ = json.Unmarshal(raw, &out)
		if strings.TrimSpace(out) != "OK" {
			return fmt.Errorf("qemu: %s: adding disk %s: %s", m.id, disk, strings.TrimSpace(out))
		}
		if _, err := m.qmp.execute(ctx, "device_add", map[string]any{
			"driver": "virtio-blk-pci", "drive": "disk0", "addr": slotDisk,
		}); err != nil {
			return fmt.Errorf("qemu: %s: plugging disk %s: %w", m.id, disk, err)
		}
		m.disk = disk
	}
	m.spec = spec
	return nil
}

// dropSpares stops the spares still waiting on the frozen memory file of
// snapshot snap: a fork restored what it wanted.
func (r *Runner) dropSpares(snap string) {
	r.frozenMu.Lock()
	f := r.frozen[snap]
	r.frozenMu.Unlock()
	if f != nil {
		r.stopSpares(f.path)
	}
}

// stopSpares stops the spares waiting on memFile, in the background.
func (r *Runner) stopSpares(memFile string) {
	r.spareMu.Lock()
	list := r.spares[memFile]
	delete(r.spares, memFile)
	r.spareMu.Unlock()
	for _, sp := range list {
		go func() { _ = sp.Stop(context.Background()) }()
	}
}

// addSpare puts sp on the list of spares waiting on memFile.
func (r *Runner) addSpare(memFile string, sp *Machine) {
	r.spareMu.Lock()
	defer r.spareMu.Unlock()
	if r.spares == nil {
		r.spares = map[string][]*Machine{}
	}
	r.spares[memFile] = append(r.spares[memFile], sp)
}

// forgetSpare takes an ended spare off the list it waits on.
func (r *Runner) forgetSpare(sp *Machine) {
	r.spareMu.Lock()
	defer r.spareMu.Unlock()
	list := r.spares[sp.memFile]
	for i, s := range list {
		if s == sp {
			r.spares[sp.memFile] = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(r.spares[sp.memFile]) == 0 {
		delete(r.spares, sp.memFile)
	}
}
