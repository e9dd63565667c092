package box

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// RunnerAuto asks for the runner boxd picks: Config.DefaultRunner.
const RunnerAuto = "auto"

// ChooseRunner returns the runner of runners that a box asking for want
// runs on: def for RunnerAuto and "", else the runner of that name. A
// runner that cannot run a box here is refused with errdefs.ErrNotImplemented
// and the reason, judged by its capabilities: it must boot Linux guests
// (Capabilities.Linux) and keep disks in files (runner.DiskFiles). Any
// other name is errdefs.ErrInvalidArgument.
func ChooseRunner(runners []runner.Runner, def, want string) (runner.Runner, error) {
	if want == "" || want == RunnerAuto {
		want = def
	}
	var names []string
	for _, r := range runners {
		if r.Name() != want {
			names = append(names, r.Name())
			continue
		}
		if caps := r.Capabilities(); !caps.Linux {
			why := caps.NoLinux
			if why == "" {
				why = "it does not boot Linux guests"
			}
			return nil, errcat.NotSupported("the %s runner cannot boot Linux boxes here: %s; use --runner %s", want, why, def)
		}
		if _, ok := r.(runner.DiskFiles); !ok {
			return nil, errcat.NotSupported("the %s runner cannot keep a box's disk (it has no disk files); use --runner %s", want, def)
		}
		return r, nil
	}
	names = append(names, RunnerAuto)
	slices.Sort(names)
	return nil, fmt.Errorf("runner %q: want %s or %s: %w", want, strings.Join(names[:len(names)-1], ", "), names[len(names)-1], errdefs.ErrInvalidArgument)
}

// ChooseRunner is the package's ChooseRunner over the manager's runners.
func (m *Manager) ChooseRunner(want string) (runner.Runner, error) {
	return ChooseRunner(m.cfg.Runners, m.cfg.DefaultRunner, want)
}

// runnerOf is the runner bx runs on.
func (m *Manager) runnerOf(bx Box) (runner.Runner, error) {
	name := bx.Runner
	if name == "" {
		name = m.cfg.DefaultRunner
	}
	r := m.runners[name]
	if r == nil {
		return nil, errcat.NotSupported("box %s runs on the %s runner, which this boxd does not have", bx.Name, name)
	}
	return r, nil
}

// Flush waits until every snapshot the runners write in the background
// (runner.BackgroundWriter) is in the store.
func (m *Manager) Flush(ctx context.Context) error {
	var errs []error
	for _, r := range m.cfg.Runners {
		if bw, ok := r.(runner.BackgroundWriter); ok {
			errs = append(errs, bw.Flush(ctx))
		}
	}
	return errors.Join(errs...)
}

// pending lists the snapshots on their way to the store and the parents
// they build on, over every runner.
func (m *Manager) pending() []string {
	var out []string
	for _, r := range m.cfg.Runners {
		if bw, ok := r.(runner.BackgroundWriter); ok {
			out = append(out, bw.Pending()...)
		}
	}
	return out
}

// release frees the memory the runners hold for snapshot snap, of which
// no more restores are due (runner.SnapshotReleaser).
func (m *Manager) release(snap string) {
	for _, r := range m.cfg.Runners {
		if rel, ok := r.(runner.SnapshotReleaser); ok {
			rel.ReleaseSnapshot(snap)
		}
	}
}

// removed tells the runners snapshot snap is gone from the store.
func (m *Manager) removed(snap string) {
	for _, r := range m.cfg.Runners {
		if rel, ok := r.(runner.SnapshotReleaser); ok {
			rel.SnapshotRemoved(snap)
		}
	}
}

// diskFiles are the runners whose disks are files.
func (m *Manager) diskFiles() []runner.DiskFiles {
	var out []runner.DiskFiles
	for _, r := range m.cfg.Runners {
		if df, ok := r.(runner.DiskFiles); ok {
			out = append(out, df)
		}
	}
	return out
}

// snapshotDisk is the disk file snapshot s froze, as its runner says.
func (m *Manager) snapshotDisk(s snapshotter.Snapshot) string {
	for _, df := range m.diskFiles() {
		if d := df.SnapshotDisk(s); d != "" {
			return d
		}
	}
	return ""
}

// diskChain is the files the disk at path reads from, as the runners say.
func (m *Manager) diskChain(path string) []string {
	var out []string
	for _, df := range m.diskFiles() {
		out = append(out, df.DiskChain(path)...)
	}
	return out
}

// currentDisk is the file mach writes now, or else the one it started on.
func currentDisk(mach runner.Machine, started string) string {
	if dm, ok := mach.(runner.DiskMachine); ok {
		return dm.Disk()
	}
	return started
}
