// Package benchkit holds what the bench programs share: their start
// (flags, progress lines, the cached Debian tree), the host facts they
// report, and their output (rows of boxd's figures beside a baseline's,
// printed as a table with a numbered legend of baselines, or as JSON).
package benchkit

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// EnvOr is the value of the environment variable name, or def when that
// is empty.
func EnvOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// Progress prints a line on stderr, after the time of day.
func Progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// Main runs the bench program prog. It parses the command line and exits
// with status 2 on arguments other than flags, or when badFlags says what
// is wrong with their values (it returns "" for nothing). Else it calls
// run, as root (needsRoot says why root is needed), with a context that
// SIGINT or SIGTERM cancels, and exits with status 1 when run fails.
func Main(prog string, badFlags func() string, needsRoot string, run func(context.Context) error) {
	ParseFlags(prog)
	if bad := badFlags(); bad != "" {
		fmt.Fprintf(os.Stderr, "%s: %s\n", prog, bad)
		os.Exit(2)
	}
	err := func() error {
		if os.Geteuid() != 0 {
			return errors.New("needs root: " + needsRoot)
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return run(ctx)
	}()
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", prog, err)
		os.Exit(1)
	}
}

// ParseFlags parses the command line, and exits with status 2 on
// arguments other than flags; prog starts the message.
func ParseFlags(prog string) {
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "%s: unexpected arguments: %s\n", prog, strings.Join(flag.Args(), " "))
		os.Exit(2)
	}
}

// Print writes rep to w as one indented JSON object when asJSON is set,
// else as table writes it.
func Print[R any](w io.Writer, asJSON bool, rep R, table func(io.Writer, R)) error {
	if !asJSON {
		table(w, rep)
		return nil
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// CachedTree is where an image of the given name is built from: the
// debootstrap-bookworm tree under cache when it is complete, locked until
// unlock is called, else "" (debootstrap is to run; unlock does nothing).
// It says which in a progress line.
func CachedTree(cache, image string) (tree string, unlock func(), err error) {
	tree = filepath.Join(cache, "debootstrap-bookworm")
	if _, err := os.Stat(tree + ".complete"); err != nil {
		Progress("building image %s with debootstrap (first run only; %s has no complete tree)", image, tree)
		return "", func() {}, nil
	}
	if unlock, err = lockTree(tree); err != nil {
		return "", nil, err
	}
	Progress("building image %s from %s (first run only)", image, tree)
	return tree, unlock, nil
}

// lockTree takes the lock the tests and benchmarks hold while they read or
// write the cached debootstrap tree (flock on TREE.lock), so the tree does
// not change while an image is built from it.
func lockTree(tree string) (unlock func(), err error) {
	f, err := os.OpenFile(tree+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
		Progress("waiting for %s (another process holds the Debian tree)", tree+".lock")
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, err
		}
	} else if err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil // closing the file releases the lock
}

// CPU is the first model name in /proc/cpuinfo, and whether its flags
// offer hardware virtualisation (vmx or svm).
func CPU() (model string, virt bool) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch {
		case !ok:
		case k == "model name" && model == "":
			model = v
		case k == "flags" && (slices.Contains(strings.Fields(v), "vmx") || slices.Contains(strings.Fields(v), "svm")):
			virt = true
		}
	}
	return model, virt
}

// QEMUVersion is the version qemu-system-x86_64 --version gives ("" when
// it does not run).
func QEMUVersion() string {
	out, err := exec.Command("qemu-system-x86_64", "--version").Output()
	if err != nil {
		return ""
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimPrefix(first, "QEMU emulator version ")
}

// KernelRelease is the running kernel's release (uname -r).
func KernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// DescribeAccel is QEMU's accelerator as the table names it: tcg with a
// note that it translates.
func DescribeAccel(accel string) string {
	if accel == "tcg" {
		accel += " (no vmx/svm: every guest instruction is translated)"
	}
	return accel
}

// Ms is a duration in milliseconds, as progress lines give it.
func Ms(d time.Duration) string {
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

// Size is a byte count in B, KiB, MiB or GiB.
func Size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
