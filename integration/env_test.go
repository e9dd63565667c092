package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"golang.org/x/sys/unix"
)

// ensurePackages installs the Debian packages that are missing, with
// apt-get; it runs apt-get update only when the first install fails.
func ensurePackages(t *testing.T, pkgs ...string) {
	t.Helper()
	var missing []string
	for _, p := range pkgs {
		out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Status}", p).Output()
		if err != nil || strings.TrimSpace(string(out)) != "installed" {
			missing = append(missing, p)
		}
	}
	if len(missing) == 0 {
		return
	}
	t.Logf("installing %s", strings.Join(missing, " "))
	install := func() ([]byte, error) {
		cmd := exec.Command("apt-get", append([]string{"install", "-y", "--no-install-recommends"}, missing...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	if out, err := install(); err != nil {
		t.Logf("apt-get install failed (%v); running apt-get update first:\n%s", err, tail(string(out), 10))
		if out, err := exec.Command("apt-get", "update").CombinedOutput(); err != nil {
			t.Fatalf("apt-get update: %v\n%s", err, tail(string(out), 20))
		}
		if out, err := install(); err != nil {
			t.Fatalf("apt-get install %s: %v\n%s", strings.Join(missing, " "), err, tail(string(out), 20))
		}
	}
}

// repoRoot is the module's root: the test runs in integration/.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "cmd", "boxd")); err != nil {
		t.Fatalf("%s is not boxd's repository root: %v", root, err)
	}
	return root
}

// boxdBinary returns $BOXD_BIN, or builds bin/boxd as `make build` does.
func boxdBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("BOXD_BIN"); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(abs); err != nil {
			t.Fatalf("BOXD_BIN: %v", err)
		}
		return abs
	}
	root := repoRoot(t)
	bin := filepath.Join(root, "bin", "boxd")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/boxd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building boxd: %v\n%s", err, out)
	}
	return bin
}

// proc is a daemon the test started, with its output in a log file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // valid after done is closed
}

// startProc starts a daemon in its own process group with its output
// appended to logPath; a cleanup stops it if the test has not.
func startProc(t *testing.T, name, logPath, bin string, args ...string) *proc {
	t.Helper()
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		if err := p.stop(10 * time.Second); err != nil {
			t.Logf("stopping %s in cleanup: %v", name, err)
		}
		if t.Failed() {
			t.Logf("last lines of %s's log (%s):\n%s", name, logPath, p.tail(40))
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to grace, then kills. It returns the
// process's exit error (nil for a clean exit), or an error saying it had to
// be killed. Stopping twice returns the first result.
func (p *proc) stop(grace time.Duration) error {
	if !p.exited() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(grace):
			_ = p.cmd.Process.Kill()
			<-p.done
			return fmt.Errorf("%s did not stop within %v of SIGTERM; killed", p.name, grace)
		}
	}
	return p.err
}

func (p *proc) tail(n int) string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return err.Error()
	}
	return tail(string(b), n)
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitSocket waits until something accepts connections on the unix socket
// path, failing if p exits first.
func waitSocket(t *testing.T, p *proc, path string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if p.exited() {
			t.Fatalf("%s exited (%v) before serving %s:\n%s", p.name, p.err, path, p.tail(30))
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not serve %s after %v: %v\n%s", p.name, path, timeout, err, p.tail(30))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// run runs a command with a timeout and returns its stdout; a failure
// includes stderr.
func run(ctx context.Context, timeout time.Duration, bin string, args ...string) (string, error) {
	stdout, _, _, err := runIn(ctx, timeout, nil, bin, args...)
	return stdout, err
}

// runIn is run with stdin, which also returns stderr and the exit code
// (an exit that is not 0 is an error too).
func runIn(ctx context.Context, timeout time.Duration, stdin io.Reader, bin string, args ...string) (string, string, int, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin = stdin
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	code := cmd.ProcessState.ExitCode()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (timed out after %v)", err, timeout)
		}
		err = fmt.Errorf("%s %s: %w\nstderr:\n%s", filepath.Base(bin), strings.Join(args, " "), err, tail(stderr.String(), 20))
	}
	return stdout.String(), stderr.String(), code, err
}

// unmountAll unmounts everything at or under dir (lazily when busy) and
// detaches the loop devices backed by files under it. It returns what it
// found, for the caller to judge.
func unmountAll(dir string) (mounts, loops []string, err error) {
	var errs []error
	// Mounts can stack: go round until none is left.
	for range 5 {
		mps, err := mountinfo.Under(dir)
		if err != nil {
			return mounts, loops, err
		}
		if len(mps) == 0 {
			break
		}
		for _, mp := range mps {
			mounts = append(mounts, mp)
			if err := unix.Unmount(mp, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
					errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
				}
			}
		}
	}
	if mps, err := mountinfo.Under(dir); err == nil && len(mps) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %s", strings.Join(mps, ", ")))
	}
	found, err := mountinfo.DetachLoopsUnder(dir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range found {
		loops = append(loops, l.Device)
	}
	return mounts, loops, errors.Join(errs...)
}

// killShims kills the containerd shims that serve the containerd at
// address (their command line names it) and returns their pids.
func killShims(address string) []int {
	var killed []int
	for _, pid := range shimPIDs(address) {
		if unix.Kill(pid, unix.SIGKILL) == nil {
			killed = append(killed, pid)
		}
	}
	return killed
}

// shimPIDs lists the containerd shims that serve the containerd at
// address.
func shimPIDs(address string) []int {
	var pids []int
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if !strings.HasPrefix(filepath.Base(argv[0]), "containerd-shim") || !containsArg(argv, address) {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(d)); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

func containsArg(argv []string, s string) bool {
	for _, a := range argv {
		if a == s || strings.HasSuffix(a, "="+s) || a == "unix://"+s {
			return true
		}
	}
	return false
}
