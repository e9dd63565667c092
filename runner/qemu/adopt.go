package qemu

// A machine of a Runner with Detached set outlives the process that
// started it (boxd). QEMU runs in a session of its own, with no
// parent-death signal, and its folder (Runner.Dir/qemu-*)
// holds, beside its QMP and agent sockets, a state file (state.json) that
// says what a later runner on the same folders needs to take it over:
// the process (pid and start time, which together name it even after the
// pid is reused), the spec, the memory file and whether it is a frozen
// snapshot's, the disk the machine writes now and its previous snapshot.
// The file is written when the machine starts, when it is handed to its
// caller (ready) and after each snapshot.
//
// Adopt takes over one machine: it opens a pidfd to see QEMU exit (QEMU
// is not the new boxd's child, so it cannot be waited for) and dials QMP
// again (QEMU takes one QMP client at a time and accepts the next once
// the dead one's connection closed). The agent's socket takes a fresh
// connection the same way; the caller dials it. Reclaim then stops and
// removes whatever of the previous boxd no Adopt took: spares, machines
// half-started, memory files nothing maps.
//
// An adopted machine's first snapshot stores every page that holds data
// (the page sums of the previous snapshot died with the old boxd); it is
// still a delta of the machine's previous snapshot, so the disk layers
// chain on.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/runner"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

var _ runner.Adopter = (*Runner)(nil)

// stateFile is the name of the state file in a machine's folder.
const stateFile = "state.json"

// machineState is a machine's state file.
type machineState struct {
	PID        int         `json:"pid"`
	StartTicks uint64      `json:"start_ticks"`
	Ready      bool        `json:"ready"`
	Accel      string      `json:"accel"`
	Spec       runner.Spec `json:"spec"`
	Console    string      `json:"console"`
	MemFile    string      `json:"mem_file"`
	// Private says MemFile is snapshot FrozenSnap's frozen file, mapped
	// copy-on-write.
	Private       bool     `json:"private,omitempty"`
	FrozenSnap    string   `json:"frozen_snap,omitempty"`
	Disk          string   `json:"disk,omitempty"`
	OwnDisk       string   `json:"own_disk,omitempty"` // a disk the runner made for the machine, gone with it
	Base          string   `json:"base,omitempty"`
	Last          string   `json:"last,omitempty"`
	UnstoredDisks []string `json:"unstored_disks,omitempty"`
	// Restoring is the snapshot whose memory boxd serves the machine
	// while it is not Ready (a lazy restore, postcopy.go).
	Restoring string `json:"restoring,omitempty"`
}

// saveState writes m's state file. The caller holds snapMu or owns m
// alone (start, restore).
func (m *Machine) saveState() error {
	if m.stopped() || m.frozen.Load() {
		return nil
	}
	st := machineState{
		PID: m.pid, StartTicks: m.startTicks, Ready: m.ready, Accel: m.accel,
		Spec: m.spec, Console: m.consolePath(), MemFile: m.memFile, Private: m.private,
		Disk: m.disk, Base: m.base, Last: m.last, UnstoredDisks: m.unstoredDisks,
	}
	if l := m.lazy.Load(); l != nil && !m.ready {
		st.Restoring = l.snap
	}
	if d := m.ownDisk.Load(); d != nil {
		st.OwnDisk = *d
	}
	if m.private {
		m.r.frozenMu.Lock()
		if f := m.r.byPath[m.memFile]; f != nil {
			st.FrozenSnap = f.snap
		}
		m.r.frozenMu.Unlock()
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := filepath.Join(m.dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(m.dir, stateFile))
}

// markReady records that m was handed to its caller: a later runner may
// adopt it.
func (m *Machine) markReady() {
	m.ready = true
	if err := m.saveState(); err != nil {
		m.r.logger().Warn("qemu: a later boxd cannot adopt this machine", "id", m.id, "err", err)
	}
}

// track and untrack keep the machines of this runner that run, by folder.
func (r *Runner) track(m *Machine) {
	r.liveMu.Lock()
	defer r.liveMu.Unlock()
	if r.live == nil {
		r.live = map[string]*Machine{}
	}
	r.live[m.dir] = m
}

func (r *Runner) untrack(m *Machine) {
	r.liveMu.Lock()
	defer r.liveMu.Unlock()
	if r.live[m.dir] == m {
		delete(r.live, m.dir)
	}
}

// ErrGone says a machine to adopt is no longer there: its QEMU exited
// while no runner watched it.
var ErrGone = fmt.Errorf("qemu: the machine's QEMU is gone: %w", errdefs.ErrNotFound)

// Adopt takes over machine id (Machine.ID), which a runner on the same
// folders started, possibly in a boxd that is gone (runner.Adopter). It
// fails with ErrGone when the machine's QEMU exited meanwhile.
func (r *Runner) Adopt(ctx context.Context, id string) (runner.Machine, error) {
	dirs, _ := filepath.Glob(filepath.Join(r.dirOrTemp(), id+"-*"))
	if len(dirs) != 1 {
		return nil, fmt.Errorf("%s: no machine folder: %w", id, ErrGone)
	}
	dir := filepath.Clean(dirs[0])
	r.liveMu.Lock()
	taken := r.live[dir] != nil
	r.liveMu.Unlock()
	if taken {
		return nil, fmt.Errorf("qemu: %s is already this runner's: %w", id, errdefs.ErrAlreadyExists)
	}
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", id, err, ErrGone)
	}
	var st machineState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("qemu: %s: state file: %w", id, err)
	}
	if !st.Ready && st.Restoring != "" {
		return nil, fmt.Errorf("qemu: %s was restoring the memory of snapshot %q when its boxd ended: %w", id, st.Restoring, runner.ErrMemoryNotRestored)
	}
	if !st.Ready {
		return nil, fmt.Errorf("qemu: %s never finished starting: %w", id, errdefs.ErrFailedPrecondition)
	}
	started := time.Duration(st.StartTicks) * (time.Second / 100) // clock ticks (USER_HZ) since boot
	pidfd, err := openProcess(st.PID, st.StartTicks)
	if err != nil {
		if oomKilled(st.PID, started) != oomNone {
			err = fmt.Errorf("the kernel's OOM killer ended QEMU (the host ran out of memory): %w", err)
		}
		return nil, fmt.Errorf("%s (pid %d): %w", id, st.PID, err)
	}
	if st.Spec.CPUModel == "" {
		st.Spec.CPUModel = LegacyCPU // started by a boxd that gave QEMU no -cpu
	}
	if st.Spec.Layout == "" {
		st.Spec.Layout = LegacyLayout // started by a boxd that recorded no layout
	}
	m := &Machine{
		r: r, spec: st.Spec, id: id, accel: st.Accel, dir: dir,
		console: st.Console,
		socket:  filepath.Join(dir, "qmp.sock"),
		agent:   filepath.Join(dir, "agent.sock"),
		memFile: st.MemFile, private: st.Private,
		disk: st.Disk, base: st.Base, last: st.Last, unstoredDisks: st.UnstoredDisks,
		pid: st.PID, startTicks: st.StartTicks, pidfd: pidfd, ready: true,
		flattening: true, // the boxd before may have left a job running
		memLimit:   r.adoptedMemoryGroup(id),
		started:    started,
		done:       make(chan struct{}),
	}
	if st.OwnDisk != "" {
		m.ownDisk.Store(&st.OwnDisk)
	}
	if m.memLimit > 0 {
		if dir, err := r.memoryGroups().Path(id); err == nil {
			m.memcg.Store(&dir) // removed when QEMU ends
		}
	}
	if m.private {
		r.holdFrozen(st.FrozenSnap, m.memFile)
		m.acquired.Store(true)
	}
	r.track(m)
	go m.waitAdopted()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := m.connect(cctx); err != nil {
		if m.stopped() {
			return nil, fmt.Errorf("qemu: %s: %w", id, ErrGone)
		}
		_ = m.Stop(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("qemu: %s: adopting: %w", id, err)
	}
	r.logger().Debug("qemu: adopted machine", "id", id, "pid", m.pid)
	return m, nil
}

// holdFrozen counts one more machine mapping path, snapshot snap's frozen
// file, which a runner that is gone made: it goes when the last of them
// stops.
func (r *Runner) holdFrozen(snap, path string) {
	r.frozenMu.Lock()
	defer r.frozenMu.Unlock()
	f := r.byPath[path]
	if f == nil {
		if snap == "" {
			snap = "adopted:" + path
		}
		f = &frozenFile{snap: snap, path: path, done: true}
		r.register(f)
	}
	f.refs++
}

// openProcess opens a pidfd of process pid if it is the one that started
// at startTicks; ErrGone if it is not there.
func openProcess(pid int, startTicks uint64) (int, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return -1, fmt.Errorf("%w: %w", err, ErrGone)
	}
	// Read after the pidfd is open: the pid cannot be reused from here.
	if t, err := procstat.StartTime(pid); err != nil || t != startTicks {
		_ = unix.Close(fd)
		return -1, fmt.Errorf("another process has its pid: %w", ErrGone)
	}
	return fd, nil
}

// waitAdopted waits for an adopted machine's QEMU to exit. It is not this
// process's child: its exit status is not known.
func (m *Machine) waitAdopted() {
	waitPidfd(m.pidfd)
	var err error
	switch {
	case m.stopping.Load():
		err = runner.ErrStopped
	case m.memcg.Load() != nil && oomKilled(m.pid, m.started) == oomCgroup:
		err = fmt.Errorf("qemu: the kernel's OOM killer ended QEMU: its memory cgroup was full (boxd bounds a machine to %d MiB of host memory: its guest's memory and %d MiB for QEMU)", m.memLimit>>20, (m.memLimit-m.spec.MemSize)>>20)
	case oomKilled(m.pid, m.started) != oomNone:
		err = errors.New("qemu: the kernel's OOM killer ended QEMU (the host ran out of memory)")
	default:
		err = errors.New("qemu: QEMU exited")
		if said := m.said(); said != "" {
			err = fmt.Errorf("%w: %s", err, said)
		}
	}
	m.exited(err)
	_ = unix.Close(m.pidfd)
}

// waitPidfd blocks until the process of pidfd has exited.
func waitPidfd(fd int) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, -1)
		if n > 0 || (err != nil && !errors.Is(err, unix.EINTR)) {
			return
		}
	}
}

// Reclaim stops and removes what a runner on the same folders that is gone
// left and no Adopt took: its machines' QEMUs (spares, machines that never
// finished starting, machines nobody adopted) and folders, and the memory
// files that no machine of this runner maps. Call it once the machines to
// keep are adopted. It returns the machines it stopped and the bytes of
// memory it freed.
func (r *Runner) Reclaim() (folders int, freed int64) {
	mine := strconv.Itoa(os.Getpid())
	keep := map[string]bool{}
	r.liveMu.Lock()
	for dir, m := range r.live {
		keep[dir], keep[m.memFile] = true, true
	}
	r.liveMu.Unlock()
	r.frozenMu.Lock()
	for p := range r.byPath {
		keep[p] = true
	}
	for p := range r.prepFiles {
		keep[p] = true
	}
	r.frozenMu.Unlock()
	ours := func(name string) bool { // named by this process (qemu-PID-..., fork-PID-...)
		f := strings.SplitN(name, "-", 3)
		return len(f) == 3 && f[1] == mine
	}
	if entries, err := os.ReadDir(r.Dir); err == nil && r.Dir != "" {
		for _, e := range entries {
			dir := filepath.Join(r.Dir, e.Name())
			if !e.IsDir() || !strings.HasPrefix(e.Name(), "qemu-") || keep[dir] || ours(e.Name()) {
				continue
			}
			if removeMachine(dir) {
				folders++
			}
		}
	}
	if entries, err := os.ReadDir(r.memDir()); err == nil {
		for _, e := range entries {
			p := filepath.Join(r.memDir(), e.Name())
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".mem") || keep[p] || ours(e.Name()) {
				continue
			}
			size := fileBlocks(p)
			if os.Remove(p) == nil {
				freed += size
			}
		}
	}
	return folders, freed
}

// KillMachines kills the QEMUs of the machine folders in dir (a
// Runner.Dir) and removes the folders; it returns how many it removed. It
// is for a process that holds the folders' root while no runner uses
// them: a test cleaning up after the daemon it killed.
func KillMachines(dir string) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), "qemu-") && removeMachine(filepath.Join(dir, e.Name())) {
			n++
		}
	}
	return n
}

// LiveMachines counts the machine folders in dir (a Runner.Dir) whose QEMU
// still runs: machines a process that is gone left for the next to adopt.
func LiveMachines(dir string) int {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "qemu-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name(), stateFile))
		var st machineState
		if err != nil || json.Unmarshal(b, &st) != nil || st.PID <= 0 {
			continue
		}
		if fd, err := openProcess(st.PID, st.StartTicks); err == nil {
			_ = unix.Close(fd)
			n++
		}
	}
	return n
}

// removeMachine kills the QEMU its state file in machine folder dir names,
// if it still runs, and removes the folder.
func removeMachine(dir string) bool {
	var st machineState
	if b, err := os.ReadFile(filepath.Join(dir, stateFile)); err == nil && json.Unmarshal(b, &st) == nil && st.PID > 0 {
		killProcess(st.PID, st.StartTicks)
	} else {
		// A runner killed between starting QEMU and writing its state
		// file left a QEMU that only its arguments name: its sockets are
		// in dir.
		killNaming(dir + "/")
	}
	return os.RemoveAll(dir) == nil
}

// killNaming kills every process whose arguments contain s, and waits a
// while for each to go.
func killNaming(s string) {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err != nil || pid == os.Getpid() {
			continue
		}
		start, err := procstat.StartTime(pid)
		if err != nil {
			continue
		}
		// The arguments are read after the start time: a process that
		// took the pid since has another start time, and openProcess
		// refuses it.
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), s) {
			killProcess(pid, start)
		}
	}
}

// killProcess kills process pid if it is the one that started at
// startTicks, and waits a while for it to go.
func killProcess(pid int, startTicks uint64) {
	fd, err := openProcess(pid, startTicks)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0) != nil {
		return
	}
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	_, _ = unix.Poll(fds, 5000)
}

// fileBlocks is the bytes a file takes (its blocks: memory files are
// sparse).
func fileBlocks(path string) int64 {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return 0
	}
	return st.Blocks * 512
}

// dirOrTemp is the folder machines' folders are in.
func (r *Runner) dirOrTemp() string {
	if r.Dir == "" {
		return os.TempDir()
	}
	return r.Dir
}

// adoptedMemoryGroup is the limit of the memory cgroup an adopted
// machine's QEMU was put in at its start, if it is still there (0 if not).
func (r *Runner) adoptedMemoryGroup(id string) int64 {
	if r.MemoryHeadroom <= 0 {
		return 0
	}
	dir, err := r.memoryGroups().Path(id)
	if err != nil {
		return 0
	}
	limit, err := procstat.MemoryLimit(dir)
	if err != nil {
		return 0
	}
	return limit
}
