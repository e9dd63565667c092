package guest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// DefaultImage is the image BuildImage makes unless told otherwise.
const DefaultImage = "debian-bookworm"

// DefaultPackages are installed on top of debootstrap's minbase variant:
// what a person at a box's shell expects and minbase lacks (ps and top,
// ip, TLS roots, a pager, an editor).
var DefaultPackages = []string{"procps", "iproute2", "ca-certificates", "less", "nano"}

// debootstrapScripts is where debootstrap keeps one script per suite it knows.
const debootstrapScripts = "/usr/share/debootstrap/scripts"

var imageNameRE = regexp.MustCompile(`^debian-([a-z]+)$`)

// suiteOf returns the Debian suite of an image BuildImage can make:
// debian-SUITE, e.g. debian-bookworm.
func suiteOf(name string) (string, error) {
	m := imageNameRE.FindStringSubmatch(name)
	if m == nil {
		return "", fmt.Errorf("boxd builds images named debian-SUITE (such as %s), not %q: %w", DefaultImage, name, errdefs.ErrInvalidArgument)
	}
	return m[1], nil
}

// missingTool says which Debian package provides a command that is not
// installed.
func missingTool(command, pkg string) error {
	return fmt.Errorf("%s is not installed: install the Debian package %s (or run scripts/deps.sh): %w", command, pkg, errdefs.ErrNotFound)
}

// fetchOptions describe one debootstrap run.
type fetchOptions struct {
	cacheDir string // holds NAME/, NAME.partial/, NAME.lock
	name     string
	suite    string
	mirror   string
	packages []string
	refetch  bool
	log      io.Writer
	progress func(stage string, done, total int64)
}

// fetchTree returns the debootstrap tree of image name and how it was
// fetched, running debootstrap first if the cache does not hold it yet (or
// refetch is set). The cache folder NAME/ holds tree/ and source; it is made
// as NAME.partial/ and renamed, so a present NAME/ is complete.
func fetchTree(ctx context.Context, o fetchOptions) (tree, source string, err error) {
	dir := filepath.Join(o.cacheDir, o.name)
	if err := os.MkdirAll(o.cacheDir, 0o755); err != nil {
		return "", "", err
	}
	unlock, err := lockFile(dir + ".lock")
	if err != nil {
		return "", "", err
	}
	defer unlock()
	tree = filepath.Join(dir, "tree")
	if !o.refetch {
		if _, err := os.Stat(tree); err == nil {
			b, _ := os.ReadFile(filepath.Join(dir, "source"))
			if source = strings.TrimSpace(string(b)); source == "" {
				source = "debootstrap " + o.suite + " (cached in " + dir + ")"
			}
			return tree, source, nil
		}
	}
	if _, err := lookTool("debootstrap"); err != nil {
		return "", "", missingTool("debootstrap", "debootstrap")
	}
	if _, err := os.Stat(filepath.Join(debootstrapScripts, o.suite)); err != nil {
		return "", "", fmt.Errorf("debootstrap does not know the suite %q (no %s/%s): %w", o.suite, debootstrapScripts, o.suite, errdefs.ErrInvalidArgument)
	}
	if os.Geteuid() != 0 {
		return "", "", fmt.Errorf("fetching an image runs debootstrap, which needs root: %w", errdefs.ErrFailedPrecondition)
	}

	partial := dir + ".partial"
	if err := removeTree(partial); err != nil {
		return "", "", err
	}
	if err := os.Mkdir(partial, 0o755); err != nil {
		return "", "", err
	}
	args := []string{"--variant=minbase"}
	if len(o.packages) > 0 {
		args = append(args, "--include="+strings.Join(o.packages, ","))
	}
	args = append(args, o.suite, filepath.Join(partial, "tree"), o.mirror)
	source = "debootstrap " + strings.Join(args[:len(args)-2], " ") + " " + o.mirror
	logFile, err := os.Create(dir + ".log")
	if err != nil {
		return "", "", err
	}
	defer logFile.Close()
	logTo := io.Writer(logFile)
	if o.log != nil {
		logTo = io.MultiWriter(logFile, o.log)
	}
	if err := debootstrap(ctx, args, logTo, o.progress); err != nil {
		err = fmt.Errorf("%w (debootstrap's output is in %s)", err, logFile.Name())
		return "", "", errors.Join(err, removeTree(partial))
	}
	if err := os.WriteFile(filepath.Join(partial, "source"), []byte(source+"\n"), 0o644); err != nil {
		return "", "", errors.Join(err, removeTree(partial))
	}
	// The tree is renamed into place only once it is on disk.
	if fd, err := unix.Open(partial, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
		_ = unix.Syncfs(fd)
		unix.Close(fd)
	}
	if _, err := os.Stat(dir); err == nil {
		old := dir + ".old"
		if err := removeTree(old); err != nil {
			return "", "", err
		}
		if err := os.Rename(dir, old); err != nil {
			return "", "", err
		}
		defer removeTree(old) //nolint:errcheck // a leftover is removed by the next refetch
	}
	if err := os.Rename(partial, dir); err != nil {
		return "", "", err
	}
	return tree, source, nil
}

// debootstrap runs debootstrap with args. Its output goes to log; each
// "I: " line it prints is reported as progress of StageFetch, and its errors
// come with a failure.
func debootstrap(ctx context.Context, args []string, log io.Writer, progress func(string, int64, int64)) error {
	lines := &lineTail{keep: 25, progress: progress}
	out := io.MultiWriter(lines, log)
	cmd := exec.CommandContext(ctx, "debootstrap", args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 10 * time.Second
	if progress != nil {
		progress(StageFetch, 0, -1)
	}
	start := time.Now()
	err := cmd.Run()
	// debootstrap mounts /proc and /sys inside the target while it works; a
	// failed or killed run can leave them mounted.
	target := args[len(args)-2]
	if uerr := unmountUnder(target); uerr != nil {
		err = errors.Join(err, uerr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("debootstrap stopped after %v: %w", time.Since(start).Round(time.Second), ctx.Err())
		}
		return fmt.Errorf("debootstrap %s failed after %v: %w: %s (is the mirror reachable? choose another with --mirror or %s)",
			strings.Join(args, " "), time.Since(start).Round(time.Second), err, lines.summary(), MirrorEnv)
	}
	return nil
}

// lineTail keeps the last lines written to it and counts debootstrap's
// "I: " lines as progress.
type lineTail struct {
	keep     int
	progress func(string, int64, int64)

	// mu protects the fields below: stdout and stderr are copied by two
	// goroutines.
	mu      sync.Mutex
	partial []byte
	lines   []string
	steps   int64
}

func (l *lineTail) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, p...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		line := string(l.partial[:i])
		l.partial = l.partial[i+1:]
		l.lines = append(l.lines, line)
		if len(l.lines) > l.keep {
			l.lines = l.lines[1:]
		}
		if strings.HasPrefix(line, "I: ") && l.progress != nil {
			l.steps++
			l.progress(StageFetch, l.steps, -1)
		}
	}
	return len(p), nil
}

// summary returns, on one line, the errors ("E: ") among the last lines,
// else the last line.
func (l *lineTail) summary() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := slices.DeleteFunc(append(slices.Clone(l.lines), string(l.partial)), func(s string) bool { return strings.TrimSpace(s) == "" })
	var errs []string
	for _, line := range lines {
		if strings.HasPrefix(line, "E: ") {
			errs = append(errs, strings.TrimSpace(line))
		}
	}
	switch {
	case len(errs) > 0:
		return strings.Join(errs, "; ")
	case len(lines) > 0:
		return strings.TrimSpace(lines[len(lines)-1])
	}
	return "no output"
}

// lockFile takes an exclusive lock on path (created if missing) and returns
// the function that releases it.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// unmountUnder unmounts everything mounted at or below dir, deepest first.
func unmountUnder(dir string) error {
	for range 5 {
		mps, err := mountinfo.Under(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
	}
	mps, err := mountinfo.Under(dir)
	if err != nil {
		return err
	}
	if len(mps) > 0 {
		return fmt.Errorf("cannot unmount %s: %w", strings.Join(mps, ", "), unix.EBUSY)
	}
	return nil
}

// removeTree removes dir, a work or cache folder, after unmounting whatever
// is mounted under it, so that nothing outside it is deleted.
func removeTree(dir string) error {
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := unmountUnder(dir); err != nil {
		return fmt.Errorf("removing %s: %w", dir, err)
	}
	return os.RemoveAll(dir)
}
