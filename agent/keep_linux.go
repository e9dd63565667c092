package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// keptTable is the agent's kept processes by ID. It lives in the
// ServerConfig, which every connection of one agent shares, so that a
// process outlives the connection that started it.
type keptTable struct {
	// mu protects byID.
	mu   sync.Mutex
	byID map[string]*kept
}

// kept is one kept process.
type kept struct {
	id       string
	pid      int
	proc     *os.Process
	terminal bool
	// stdin is the input's pipe, or the pty's master with a terminal.
	stdin *os.File
	// master is the pty's master with a terminal, for resizes.
	master *os.File
	outs   []*keptOutput // stdout, then stderr without a terminal
	logf   func(format string, args ...any)

	// stdinOnce closes the input once; inputClosed says it was.
	stdinOnce   sync.Once
	inputClosed atomic.Bool

	// mu protects the fields below; cond is signalled when one changes.
	mu       sync.Mutex
	cond     *sync.Cond
	att      *attachment // the channel attached now, or nil
	exited   bool        // reaped; status is its exit status
	status   int
	complete bool // exited, and every byte of output was sent
	forgot   bool // forgotten: nothing waits for an attachment any more
}

// lookup returns kept process id, or an error wrapping errdefs.ErrNotFound.
func (t *keptTable) lookup(id string) (*kept, error) { return t.find(id, false) }

// remove forgets kept process id and returns it.
func (t *keptTable) remove(id string) (*kept, error) { return t.find(id, true) }

// find returns kept process id, taken out of the table if remove.
func (t *keptTable) find(id string, remove bool) (*kept, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	k, ok := t.byID[id]
	if !ok {
		return nil, fmt.Errorf("agent: no kept process %q: %w", id, errdefs.ErrNotFound)
	}
	if remove {
		delete(t.byID, id)
	}
	return k, nil
}

// list describes the kept processes, by ID.
func (t *keptTable) list() []ProcessInfo {
	t.mu.Lock()
	ks := make([]*kept, 0, len(t.byID))
	for _, k := range t.byID {
		ks = append(ks, k)
	}
	t.mu.Unlock()
	out := make([]ProcessInfo, 0, len(ks))
	for _, k := range ks {
		k.mu.Lock()
		out = append(out, ProcessInfo{ID: k.id, Pid: k.pid, Running: !k.exited, ExitCode: k.status})
		k.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// start starts spec as a kept process under cfg and adds it to the table;
// the table's lock is held across, so that an ID is started once.
func (t *keptTable) start(cfg *ServerConfig, spec ProcessSpec) (*kept, error) {
	if err := checkProcessSpec(spec); err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.byID[spec.ID]; ok {
		return nil, fmt.Errorf("agent: a kept process %q exists already: %w", spec.ID, errdefs.ErrAlreadyExists)
	}
	if spec.Hostname != "" {
		if cfg.System == nil {
			return nil, fmt.Errorf("agent: process %q: this agent does not set the hostname: %w", spec.ID, errdefs.ErrNotImplemented)
		}
		if err := cfg.System.SetHostname(spec.Hostname); err != nil {
			return nil, fmt.Errorf("agent: process %q: hostname: %w", spec.ID, err)
		}
	}
	k, err := startKept(cfg, spec)
	if err != nil {
		return nil, err
	}
	if t.byID == nil {
		t.byID = map[string]*kept{}
	}
	t.byID[spec.ID] = k
	return k, nil
}

// checkProcessSpec refuses a spec that cannot be started: no ID, no
// program, a terminal size out of range, a bad hostname.
func checkProcessSpec(spec ProcessSpec) error {
	switch {
	case spec.ID == "":
		return fmt.Errorf("agent: a kept process needs an ID: %w", errdefs.ErrInvalidArgument)
	case len(spec.Args) == 0 || spec.Args[0] == "":
		return fmt.Errorf("agent: process %q: no program: %w", spec.ID, errdefs.ErrInvalidArgument)
	case spec.Rows < 0 || spec.Cols < 0 || spec.Rows > 0xffff || spec.Cols > 0xffff:
		return fmt.Errorf("agent: process %q: a terminal of %d x %d: %w", spec.ID, spec.Rows, spec.Cols, errdefs.ErrInvalidArgument)
	}
	if spec.Hostname != "" {
		return ValidateHostname(spec.Hostname)
	}
	return nil
}

// lookPath finds program name as execve would run it: a name with a slash
// as it is, else in the directories of path (the spec's PATH, or
// DefaultPath).
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	path := DefaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && unix.Access(p, unix.X_OK) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("agent: %q is not in PATH %s: %w", name, path, errdefs.ErrNotFound)
}

// startKept starts spec's program with its streams on pipes or a pty, and
// the goroutine that waits for its end.
func startKept(cfg *ServerConfig, spec ProcessSpec) (*kept, error) {
	prog, args, attr, err := keptCommand(spec)
	if err != nil {
		return nil, fmt.Errorf("agent: process %q: %w", spec.ID, err)
	}
	k := &kept{id: spec.ID, terminal: spec.Terminal, logf: cfg.logf}
	k.cond = sync.NewCond(&k.mu)
	var closeAfterStart, closeOnFailure []*os.File
	if spec.Terminal {
		master, tty, err := openKeptPTY(spec.Rows, spec.Cols)
		if err != nil {
			return nil, fmt.Errorf("agent: process %q: %w", spec.ID, err)
		}
		attr.Files = []*os.File{tty, tty, tty}
		attr.Sys.Setctty, attr.Sys.Ctty = true, 0
		closeAfterStart = append(closeAfterStart, tty)
		closeOnFailure = append(closeOnFailure, master)
		k.stdin, k.master = master, master
		k.outs = []*keptOutput{{f: master, ext: false}}
	} else {
		var pipes [3][2]*os.File // stdin, stdout, stderr: read end, write end
		for i := range pipes {
			r, w, err := os.Pipe()
			if err != nil {
				for _, f := range append(closeAfterStart, closeOnFailure...) {
					f.Close()
				}
				return nil, fmt.Errorf("agent: process %q: %w", spec.ID, err)
			}
			pipes[i] = [2]*os.File{r, w}
			if i == 0 {
				closeAfterStart, closeOnFailure = append(closeAfterStart, r), append(closeOnFailure, w)
			} else {
				closeAfterStart, closeOnFailure = append(closeAfterStart, w), append(closeOnFailure, r)
			}
		}
		attr.Files = []*os.File{pipes[0][0], pipes[1][1], pipes[2][1]}
		k.stdin = pipes[0][1]
		k.outs = []*keptOutput{{f: pipes[1][0]}, {f: pipes[2][0], ext: true}}
	}
	proc, wait, err := startProcess(cfg.Reaper, prog, args, attr)
	for _, f := range closeAfterStart {
		f.Close()
	}
	if err != nil {
		for _, f := range closeOnFailure {
			f.Close()
		}
		return nil, fmt.Errorf("agent: process %q: start %s: %w", spec.ID, prog, startCategory(err))
	}
	k.proc, k.pid = proc, proc.Pid
	for _, o := range k.outs {
		o.done = make(chan struct{})
		go k.pump(o)
	}
	go k.await(wait)
	return k, nil
}

// keptCommand is the program, arguments and attributes that start spec's
// process (its streams aside). A process in a root of its own is started
// as EnterName, which takes the credentials itself once it is in the root.
func keptCommand(spec ProcessSpec) (string, []string, *os.ProcAttr, error) {
	dir := spec.Cwd
	if dir == "" {
		dir = "/"
	}
	attr := &os.ProcAttr{Dir: dir, Env: append([]string{}, spec.Env...), Sys: &syscall.SysProcAttr{Setsid: true}}
	if spec.Root == "" || filepath.Clean(spec.Root) == "/" {
		prog, err := lookPath(spec.Args[0], spec.Env)
		if err != nil {
			return "", nil, nil, err
		}
		attr.Sys.Credential = &syscall.Credential{Uid: spec.UID, Gid: spec.GID, Groups: append([]uint32{}, spec.AdditionalGids...)}
		return prog, spec.Args, attr, nil
	}
	root := filepath.Clean(spec.Root)
	if fi, err := os.Stat(root); err != nil || !fi.IsDir() {
		return "", nil, nil, fmt.Errorf("agent: root file system %s is not a folder of the box: %w", root, errdefs.ErrNotFound)
	}
	if err := lookPathIn(root, spec.Args[0], spec.Env); err != nil {
		return "", nil, nil, err
	}
	attr.Dir = "/"
	attr.Sys.Unshareflags = syscall.CLONE_NEWNS
	args := append([]string{EnterName}, EnterArgs(root, dir, spec.UID, spec.GID, spec.AdditionalGids, spec.Args)...)
	return "/proc/self/exe", args, attr, nil
}

// lookPathIn checks that program name is in root, at its path or in a
// directory of the spec's PATH (DefaultPath without one), so that a
// missing program is refused as it is without a root; EnterName finds it
// again from inside the root.
func lookPathIn(root, name string, env []string) error {
	if strings.Contains(name, "/") {
		if _, err := os.Lstat(filepath.Join(root, name)); err != nil {
			return fmt.Errorf("agent: %s is not in root file system %s: %w", name, root, errdefs.ErrNotFound)
		}
		return nil
	}
	path := DefaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if _, err := os.Lstat(filepath.Join(root, dir, name)); err == nil {
			return nil
		}
	}
	return fmt.Errorf("agent: %q is not in PATH %s of root file system %s: %w", name, path, root, errdefs.ErrNotFound)
}

// startCategory categorises a failure to start a program.
func startCategory(err error) error {
	switch {
	case os.IsNotExist(err):
		return fmt.Errorf("%w: %w", err, errdefs.ErrNotFound)
	case os.IsPermission(err):
		return fmt.Errorf("%w: %w", err, errdefs.ErrPermissionDenied)
	}
	return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
}

// openKeptPTY opens a pty of rows x cols (24 x 80 when zero): its pollable
// master and the child's end.
func openKeptPTY(rows, cols int) (master, tty *os.File, err error) {
	m, t, err := pty.Open()
	if err != nil {
		return nil, nil, fmt.Errorf("open pty: %w", err)
	}
	master, err = pollable(m)
	if err != nil {
		t.Close()
		return nil, nil, err
	}
	if rows == 0 || cols == 0 {
		rows, cols = 24, 80
	}
	if err := setWinsize(master, uint32(rows), uint32(cols)); err != nil {
		master.Close()
		t.Close()
		return nil, nil, err
	}
	return master, t, nil
}

// exitCode is a wait status as a session's exit-status reports it: 128+n
// for a death by signal n.
func exitCode(ws unix.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

// signal sends sig to the process (with a terminal, to its process group)
// while it runs: its pid, not yet reaped, cannot name another process.
func (k *kept) signal(sig int) error {
	if sig <= 0 || sig > 64 {
		return fmt.Errorf("agent: process %q: signal %d: %w", k.id, sig, errdefs.ErrInvalidArgument)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.exited {
		return fmt.Errorf("agent: process %q has exited: %w", k.id, errdefs.ErrNotFound)
	}
	pid := k.pid
	if k.terminal {
		pid = -pid
	}
	if err := unix.Kill(pid, syscall.Signal(sig)); err != nil {
		return fmt.Errorf("agent: process %q: signal %d: %w", k.id, sig, err)
	}
	return nil
}

// resize changes the process's terminal size.
func (k *kept) resize(rows, cols int) error {
	if k.master == nil {
		return fmt.Errorf("agent: process %q has no terminal: %w", k.id, errdefs.ErrFailedPrecondition)
	}
	if rows <= 0 || cols <= 0 || rows > 0xffff || cols > 0xffff {
		return fmt.Errorf("agent: process %q: a terminal of %d x %d: %w", k.id, rows, cols, errdefs.ErrInvalidArgument)
	}
	if err := setWinsize(k.master, uint32(rows), uint32(cols)); err != nil {
		return fmt.Errorf("agent: process %q: resize: %w", k.id, err)
	}
	return nil
}
