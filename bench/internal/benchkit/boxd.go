package benchkit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Timed runs a command and returns its wall time, from just before it
// starts to its exit, and its stdout; a non-zero exit is an error that
// carries its stderr.
func Timed(ctx context.Context, name string, args ...string) (time.Duration, []byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if err != nil {
		return took, out.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return took, out.Bytes(), nil
}

// LoadAvg is the first three fields of /proc/loadavg.
func LoadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	return strings.Join(f[:min(3, len(f))], " ")
}

// Boxd is the boxd binary Bin working on the root folder Root, driven
// through its CLI as a user drives it.
type Boxd struct {
	Bin  string // absolute
	Root string // absolute
}

// CLI runs boxd on the root (Timed).
func (b Boxd) CLI(ctx context.Context, args ...string) (time.Duration, []byte, error) {
	return Timed(ctx, b.Bin, append([]string{"--root", b.Root}, args...)...)
}

// BoxState is a box as `boxd ls --json` lists it.
type BoxState struct {
	Name  string `json:"name"`
	State string `json:"state"`
}

// named is the name field of what boxd lists in JSON.
type named struct {
	Name string `json:"name"`
}

// Boxes is `boxd ls --json`: each box's name and state.
func (b Boxd) Boxes(ctx context.Context) ([]BoxState, error) {
	_, out, err := b.CLI(ctx, "ls", "--json")
	if err != nil {
		return nil, err
	}
	var bs []BoxState
	if err := json.Unmarshal(out, &bs); err != nil {
		return nil, fmt.Errorf("boxd ls --json: %w", err)
	}
	return bs, nil
}

// State is box name's state, as `boxd ls --json` lists it.
func (b Boxd) State(ctx context.Context, name string) (string, error) {
	bs, err := b.Boxes(ctx)
	if err != nil {
		return "", err
	}
	for _, bx := range bs {
		if bx.Name == name {
			return bx.State, nil
		}
	}
	return "", fmt.Errorf("box %s is not listed", name)
}

// RemoveBoxes removes every box of the root and returns how many.
func (b Boxd) RemoveBoxes(ctx context.Context) (int, error) {
	bs, err := b.Boxes(ctx)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, bx := range bs {
		if _, _, err := b.CLI(ctx, "rm", bx.Name); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// EnsureImage builds image unless the root has it: from the
// debootstrap-bookworm tree under cache when that is complete (CachedTree),
// else with debootstrap (cached in ROOT/cache/rootfs). It returns how long
// the build took (0: the root had the image).
func (b Boxd) EnsureImage(ctx context.Context, image, cache string) (time.Duration, error) {
	_, out, err := b.CLI(ctx, "image", "ls", "--json")
	if err != nil {
		return 0, err
	}
	var imgs []named
	if err := json.Unmarshal(out, &imgs); err != nil {
		return 0, fmt.Errorf("boxd image ls --json: %w", err)
	}
	if slices.Contains(imgs, named{image}) {
		return 0, nil
	}
	args := []string{"image", "build", "--name", image}
	tree, unlock, err := CachedTree(cache, image)
	if err != nil {
		return 0, err
	}
	defer unlock()
	if tree != "" {
		args = append(args, "--tree", tree)
	}
	took, _, err := b.CLI(ctx, args...)
	return took, err
}

// BoxSnapshots names the store's box snapshots (box.NAME.SNAP), parents
// first. The daemon must not be running: it owns the store.
func (b Boxd) BoxSnapshots(ctx context.Context) ([]string, error) {
	_, out, err := b.CLI(ctx, "store", "ls", "--json")
	if err != nil {
		return nil, err
	}
	var snaps []named
	if err := json.Unmarshal(out, &snaps); err != nil {
		return nil, fmt.Errorf("boxd store ls --json: %w", err)
	}
	var names []string
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, "box.") {
			names = append(names, s.Name)
		}
	}
	return names, nil
}

// StoreCleared is what ClearStore dropped.
type StoreCleared struct {
	// SnapshotsRemoved and DisksRemoved are what boxd kept of removed boxes:
	// their snapshots (box.*) in the store and overlay files in ROOT/disks.
	SnapshotsRemoved int   `json:"box_snapshots_removed"`
	DisksRemoved     int   `json:"disk_files_removed"`
	GCFreedBytes     int64 `json:"gc_freed_bytes"`
}

// ClearStore drops what boxd keeps of removed boxes: their snapshots
// (children first), the store's garbage, and the overlay files left in
// ROOT/disks. Only for a root with no boxes and no daemon running.
func (b Boxd) ClearStore(ctx context.Context) (StoreCleared, error) {
	var c StoreCleared
	snaps, err := b.BoxSnapshots(ctx)
	if err != nil {
		return c, err
	}
	for i := len(snaps) - 1; i >= 0; i-- {
		if _, _, err := b.CLI(ctx, "store", "rm", snaps[i]); err != nil {
			return c, err
		}
		c.SnapshotsRemoved++
	}
	_, out, err := b.CLI(ctx, "store", "gc", "--json")
	if err != nil {
		return c, err
	}
	var gc struct {
		Freed int64 `json:"bytes_freed"`
	}
	if err := json.Unmarshal(out, &gc); err != nil {
		return c, fmt.Errorf("boxd store gc --json: %w", err)
	}
	c.GCFreedBytes = gc.Freed
	disks, _ := filepath.Glob(filepath.Join(b.Root, "disks", "*"))
	for _, f := range disks {
		if err := os.Remove(f); err != nil {
			return c, err
		}
		c.DisksRemoved++
	}
	return c, nil
}

// QEMUs lists (pgrep -a) the QEMU processes of the root.
func (b Boxd) QEMUs(ctx context.Context) ([]string, []int) {
	return pgrep(ctx, `qemu-system-x86_64 .*`+regexp.QuoteMeta(b.Root+"/"))
}

// LeftProcesses lists (pgrep -a) the QEMUs and daemons of the root.
func (b Boxd) LeftProcesses(ctx context.Context) ([]string, []int) {
	return pgrep(ctx, `qemu-system-x86_64 .*`+regexp.QuoteMeta(b.Root+"/"), regexp.QuoteMeta("--root "+b.Root+" daemon"))
}

// pgrep lists the processes (pgrep -a -f) whose command lines match any
// of patterns: their lines and pids.
func pgrep(ctx context.Context, patterns ...string) ([]string, []int) {
	var lines []string
	var pids []int
	for _, pat := range patterns {
		out, _ := exec.CommandContext(ctx, "pgrep", "-a", "-f", "--", pat).Output() // exit 1: none
		for l := range strings.Lines(string(out)) {
			l = strings.TrimSpace(l)
			pid, _, _ := strings.Cut(l, " ")
			if n, err := strconv.Atoi(pid); err == nil && !slices.Contains(pids, n) {
				pids = append(pids, n)
				lines = append(lines, l)
			}
		}
	}
	return lines, pids
}

// Daemon is a `boxd daemon` of the root that StartDaemon started.
type Daemon struct {
	// Ready is the first line the daemon printed on stdout, once it served:
	// "boxd daemon on ROOT: API on …, SSH on ADDR[, metrics on URL]".
	Ready string
	cmd   *exec.Cmd // nil once stopped
	pid   int
	done  chan struct{} // closed once the daemon has exited
	log   string
}

// StartDaemon starts `boxd daemon` on the root with args, its output
// appended to the file log, in its own process group (a ^C reaches the
// bench, which removes the boxes first) and killed should the bench die
// (its QEMUs die with it), and waits for the line it prints on stdout once
// it serves.
func (b Boxd) StartDaemon(ctx context.Context, log string, args ...string) (*Daemon, error) {
	f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	// The daemon's stdout is a pipe of our own, not one exec copies from,
	// so that waiting for the daemon never waits for its readers.
	pr, pw, err := os.Pipe()
	if err != nil {
		f.Close()
		return nil, err
	}
	_ = os.Remove(filepath.Join(b.Root, "boxd.sock")) // a killed daemon's; the new one makes its own
	cmd := exec.Command(b.Bin, append([]string{"--root", b.Root, "daemon"}, args...)...)
	cmd.Stdout, cmd.Stderr = pw, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		f.Close()
		return nil, fmt.Errorf("starting boxd daemon: %w", err)
	}
	d := &Daemon{cmd: cmd, pid: cmd.Process.Pid, done: make(chan struct{}), log: log}
	go func() { _ = cmd.Wait(); close(d.done) }()
	first := make(chan string, 1)
	go func() { // until every holder of the pipe's write end has exited
		defer f.Close()
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		for i := 0; sc.Scan(); i++ {
			if i == 0 {
				first <- sc.Text()
			}
			fmt.Fprintln(f, sc.Text())
		}
	}()
	select {
	case d.Ready = <-first:
		return d, nil
	case <-d.done:
		return nil, fmt.Errorf("boxd daemon exited while starting: %s (its log: %s)", cmd.ProcessState, log)
	case <-ctx.Done():
		err = ctx.Err()
	case <-time.After(time.Minute):
		err = errors.New("boxd daemon did not serve within a minute")
	}
	_ = d.Stop()
	return nil, fmt.Errorf("%w (its log: %s)", err, log)
}

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.pid }

// Stop stops the daemon with SIGTERM (it hibernates running boxes first),
// killing it after two minutes. A second call does nothing.
func (d *Daemon) Stop() error {
	if d == nil || d.cmd == nil {
		return nil
	}
	cmd := d.cmd
	d.cmd = nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-d.done
		return errors.New("boxd daemon did not stop on SIGTERM within 2 minutes: killed")
	}
	if st := cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("boxd daemon exited: %s (its log: %s)", st, d.log)
	}
	return nil
}

// Cleanup is what the end of a run removed and found.
type Cleanup struct {
	BoxesRemoved int `json:"boxes_removed"`
	StoreCleared
	// ProcessesLeft are pgrep's lines for QEMU or a daemon of the root once
	// the daemon had stopped (killed then); none is the goal.
	ProcessesLeft []string `json:"processes_left"`
}

// Clean ends a run on the root: it removes every box through the daemon d
// and stops d (d nil: no daemon runs, and the boxes stay), checks that no
// QEMU or daemon of the root is left (killing any), and, once the boxes are
// gone, drops what boxd kept of them (ClearStore). It says what it did in a
// progress line.
func (b Boxd) Clean(d *Daemon) (Cleanup, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var c Cleanup
	var errs []error
	boxesGone := false
	if d != nil {
		n, err := b.RemoveBoxes(ctx)
		c.BoxesRemoved = n
		if err != nil {
			errs = append(errs, fmt.Errorf("removing boxes: %w", err))
		} else {
			boxesGone = true
		}
		if err := d.Stop(); err != nil {
			errs = append(errs, err)
		}
	}
	lines, pids := b.LeftProcesses(ctx)
	c.ProcessesLeft = lines
	if len(lines) > 0 {
		errs = append(errs, fmt.Errorf("left running after the daemon stopped (killed now): %s", strings.Join(lines, "; ")))
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if boxesGone {
		sc, err := b.ClearStore(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("dropping the removed boxes' snapshots: %w", err))
		}
		c.StoreCleared = sc
	}
	Progress("cleaned up: %d boxes removed; boxd had kept %d of their snapshots and %d overlay files in %s (dropped, gc freed %s); QEMUs or daemons of the root left: %d",
		c.BoxesRemoved, c.SnapshotsRemoved, c.DisksRemoved, filepath.Join(b.Root, "disks"), Size(c.GCFreedBytes), len(lines))
	return c, errors.Join(errs...)
}

// ShowTail prints the last n lines of the file path on stderr, under a
// line naming it (nothing when it is empty or missing).
func ShowTail(path string, n int) {
	data, err := os.ReadFile(path)
	if err != nil || len(data) == 0 {
		return
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	fmt.Fprintf(os.Stderr, "the end of %s:\n", path)
	for _, l := range lines[max(0, len(lines)-n):] {
		fmt.Fprintf(os.Stderr, "  %s\n", l)
	}
}

// DaemonLog is the daemon's log in a benchmark's kept folder.
func DaemonLog(dir string) string { return filepath.Join(dir, "daemon.log") }

// OpenRoot is a box benchmark's start: it makes dir absolute, finds the
// boxd binary boxdBin, checks that the tools are on PATH (script names
// what installs them), makes the kept root DIR/root and an empty
// DaemonLog, and returns the Boxd on that root and the absolute dir.
func OpenRoot(dir, boxdBin, script string, tools ...string) (Boxd, string, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return Boxd{}, "", err
	}
	bin, err := exec.LookPath(boxdBin)
	if err != nil {
		return Boxd{}, "", fmt.Errorf("the boxd binary (make build): %w", err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return Boxd{}, "", err
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			return Boxd{}, "", fmt.Errorf("%s is missing (%s installs it): %w", tool, script, err)
		}
	}
	b := Boxd{Bin: bin, Root: filepath.Join(d, "root")}
	if err := os.MkdirAll(b.Root, 0o700); err != nil {
		return Boxd{}, "", err
	}
	if err := os.WriteFile(DaemonLog(d), nil, 0o600); err != nil {
		return Boxd{}, "", err
	}
	return b, d, nil
}
