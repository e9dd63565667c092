package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"

	"github.com/boxd-dev/boxd/runner"
)

// Warm starts n spares for forks of m, which must run on a memory file of
// its own. A spare is QEMU started ahead of time with m's machine, less its
// disk: it maps m's memory file copy-on-write and waits, paused, for device
// state (-incoming defer). Until m is frozen it reads nothing of the file,
// so it sees m's memory as it will be at the freeze. A Restore of the
// snapshot that m's Freeze takes then uses a spare instead of starting
// QEMU: it attaches the restore's disk and console and loads the device
// state, which takes process start off a fork's critical path.
//
// Spares of m are stopped when m ends other than by Freeze, and spares of
// a frozen file when the file is dropped.
func (m *Machine) Warm(ctx context.Context, n int) error {
	if m.private {
		return fmt.Errorf("qemu: %s maps a frozen memory file copy-on-write; only a machine on its own memory file has spares: %w", m.id, runner.ErrNotSupported)
	}
	if m.stopped() {
		return m.exit
	}
	spec := m.specLabel()
	for range n {
		sp, err := m.r.launch(ctx, spec, launchOptions{memFile: m.memFile, incoming: true})
		if err != nil {
			return fmt.Errorf("qemu: a spare for %s: %w", m.id, err)
		}
		m.r.spareMu.Lock()
		if m.r.spares == nil {
			m.r.spares = map[string][]*Machine{}
		}
		m.r.spares[m.memFile] = append(m.r.spares[m.memFile], sp)
		m.r.spareMu.Unlock()
		switch {
		case m.frozen.Load():
			// A freeze while the spare started: it maps the frozen file,
			// and goes with it; if the file went already, it goes now.
			if !m.r.isFrozenFile(m.memFile) {
				m.r.stopSpares(m.memFile)
				return nil
			}
		case m.stopped(): // m ended while the spare started
			m.r.stopSpares(m.memFile)
			return m.exit
		}
	}
	return nil
}

func (r *Runner) isFrozenFile(path string) bool {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	return r.byPath[path] != nil
}

// Spares is how many spares wait on m's memory file.
func (m *Machine) Spares() int {
	m.r.spareMu.Lock()
	defer m.r.spareMu.Unlock()
	return len(m.r.spares[m.memFile])
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
			// It ended before it was taken: if its exit did not give the
			// reference back, give it back here, and try the next.
			if sp.released.CompareAndSwap(false, true) {
				r.release(memFile)
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
	if spare.Boot != spec.Boot || spare.MemSize != spec.MemSize || max(spare.CPUs, 1) != max(spec.CPUs, 1) {
		return false
	}
	strip := func(o map[string]string) map[string]string {
		o = maps.Clone(o)
		delete(o, OptionDisk)
		delete(o, OptionConsole)
		delete(o, OptionBase)
		if o[OptionNet] == "" {
			o[OptionNet] = NetUser
		}
		return o
	}
	return maps.Equal(strip(spare.Options), strip(spec.Options))
}

// takeOver makes a spare the machine of spec: the console goes to spec's
// console file and spec's disk is plugged in where a machine started with
// it has it.
func (m *Machine) takeOver(ctx context.Context, spec runner.Spec) error {
	if c := spec.Options[OptionConsole]; c != "" {
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
	if disk := spec.Options[OptionDisk]; disk != "" {
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
