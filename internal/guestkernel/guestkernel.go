// Package guestkernel fetches the Linux kernel that boxd boots its guests with: Debian's cloud kernel,
// downloaded with apt-get and unpacked with dpkg-deb into a cache folder. Nothing is installed on the host.
package guestkernel

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/containerd/errdefs"
)

// MetaPackage is the Debian package that depends on the current cloud kernel.
const MetaPackage = "linux-image-cloud-amd64"

// Kernel is an unpacked kernel package.
type Kernel struct {
	Package    string // the Debian package, e.g. linux-image-6.1.0-48-cloud-amd64
	Release    string // the kernel release (uname -r), e.g. 6.1.0-48-cloud-amd64
	Root       string // the folder the package was unpacked into
	Vmlinuz    string // the kernel image, for QEMU's -kernel
	ModulesDir string // lib/modules/RELEASE inside Root
}

// DefaultCacheDir is where Fetch keeps kernels unless told otherwise: $BOXD_CACHE_DIR/guestkernel, else the
// user's cache folder's boxd/guestkernel.
func DefaultCacheDir() (string, error) {
	if dir := os.Getenv("BOXD_CACHE_DIR"); dir != "" {
		return filepath.Join(dir, "guestkernel"), nil
	}
	dir, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("guestkernel: %w", err)
	}
	return filepath.Join(dir, "boxd", "guestkernel"), nil
}

// Fetch resolves MetaPackage to the kernel package it depends on and returns that package, unpacked under
// cacheDir (see FetchPackage). The answer is kept in cacheDir too (see ResolvePackage).
func Fetch(ctx context.Context, cacheDir string) (*Kernel, error) {
	pkg, err := resolve(ctx, cacheDir)
	if err != nil {
		return nil, err
	}
	return FetchPackage(ctx, cacheDir, pkg)
}

// ResolvePackage asks apt-cache which kernel package MetaPackage depends on. The answer is kept while apt's
// package lists and sources stay as they were: where apt's binary cache is turned off (Debian's container
// images turn it off), apt-cache reads every list on each run, about a second, and each cold boot of a box
// asks.
func ResolvePackage(ctx context.Context) (string, error) {
	return resolve(ctx, "")
}

// resolvedFile is the file in a cache folder that keeps ResolvePackage's answer across processes: the package
// on its first line, the stamp of apt's state after it.
const resolvedFile = "resolved"

// resolve is ResolvePackage, kept in cacheDir too unless it is "".
func resolve(ctx context.Context, cacheDir string) (string, error) {
	stamp := aptStamp(aptState)
	resolved.Lock()
	defer resolved.Unlock()
	if stamp != "" && stamp == resolved.stamp {
		return resolved.pkg, nil
	}
	kept := ""
	if cacheDir != "" {
		kept = filepath.Join(cacheDir, resolvedFile)
		if b, err := os.ReadFile(kept); err == nil && stamp != "" {
			if pkg, rest, ok := strings.Cut(string(b), "\n"); ok && rest == stamp && pkg != "" {
				resolved.stamp, resolved.pkg = stamp, pkg
				return pkg, nil
			}
		}
	}
	aptRuns.Add(1)
	out, err := run(ctx, "", "apt-cache", "depends", MetaPackage)
	if err != nil {
		return "", err
	}
	pkg, err := parseDepends(out)
	if err != nil {
		return "", err
	}
	resolved.stamp, resolved.pkg = stamp, pkg
	if kept != "" && stamp != "" {
		keep(kept, pkg+"\n"+stamp) // a cache: failing to write it costs the next process a run
	}
	return pkg, nil
}

// keep writes data to path whole or not at all.
func keep(path, data string) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return
	}
	_, werr := f.WriteString(data)
	if err := errors.Join(werr, f.Close()); err != nil {
		_ = os.Remove(f.Name())
		return
	}
	if err := os.Rename(f.Name(), path); err != nil {
		_ = os.Remove(f.Name())
	}
}

// resolved is ResolvePackage's last answer and the stamp of apt's state it came from.
var resolved struct {
	sync.Mutex
	stamp, pkg string
}

// aptRuns counts ResolvePackage's runs of apt-cache.
var aptRuns atomic.Int64

// aptState are the files and folders whose change can change apt-cache's answer: apt-get update renames new
// lists into the lists folder, and the sources say which lists count.
var aptState = []string{"/var/lib/apt/lists", "/etc/apt/sources.list", "/etc/apt/sources.list.d", "/etc/apt/preferences",
	"/etc/apt/preferences.d"}

// aptStamp describes paths as they are now (modification time and size of each, or that it is missing), and
// of the entries of the ".d" folders among them, whose files are edited in place; "" when one cannot be read,
// which keeps no answer. Other folders (the lists) change by renames, which the folder's time shows.
func aptStamp(paths []string) string {
	var b strings.Builder
	for _, p := range paths {
		fi, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(&b, "%s missing\n", p)
			continue
		}
		if err != nil {
			return ""
		}
		fmt.Fprintf(&b, "%s %d %d\n", p, fi.ModTime().UnixNano(), fi.Size())
		if !fi.IsDir() || !strings.HasSuffix(p, ".d") {
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			return ""
		}
		for _, e := range entries {
			info, err := e.Info()
			if err != nil {
				return ""
			}
			fmt.Fprintf(&b, "%s/%s %d %d\n", p, e.Name(), info.ModTime().UnixNano(), info.Size())
		}
	}
	return b.String()
}

// parseDepends finds the first "Depends: linux-image-..." line in apt-cache depends output.
func parseDepends(out []byte) (string, error) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		dep, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Depends:")
		if !ok {
			continue
		}
		if dep = strings.TrimSpace(dep); strings.HasPrefix(dep, "linux-image-") && !strings.ContainsAny(dep, "<> /") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("guestkernel: apt-cache depends %s names no linux-image package (run apt-get update?): %w",
		MetaPackage, errdefs.ErrNotFound)
}

// FetchPackage returns the kernel package pkg unpacked under cacheDir/pkg, downloading and unpacking it first
// if it is not there yet. The folder appears by an atomic rename once unpacking is complete, so a present
// folder is a complete one, and concurrent callers agree on it.
func FetchPackage(ctx context.Context, cacheDir, pkg string) (*Kernel, error) {
	release, ok := strings.CutPrefix(pkg, "linux-image-")
	if !ok || release == "" || strings.ContainsAny(release, "/ ") {
		return nil, fmt.Errorf("guestkernel: %q is not a linux-image package: %w", pkg, errdefs.ErrInvalidArgument)
	}
	final := filepath.Join(cacheDir, pkg)
	if _, err := os.Stat(final); errors.Is(err, os.ErrNotExist) {
		if err := unpack(ctx, cacheDir, pkg, final); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("guestkernel: %w", err)
	}
	k := &Kernel{
		Package:    pkg,
		Release:    release,
		Root:       final,
		Vmlinuz:    filepath.Join(final, "boot", "vmlinuz-"+release),
		ModulesDir: filepath.Join(final, "lib", "modules", release),
	}
	for _, p := range []string{k.Vmlinuz, k.ModulesDir} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("guestkernel: package %s unpacked in %s lacks %s: %w", pkg, final, p, errdefs.ErrNotFound)
		}
	}
	return k, nil
}

// unpack downloads pkg into a work folder under cacheDir, unpacks it there and renames the result to final.
func unpack(ctx context.Context, cacheDir, pkg, final string) error {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return fmt.Errorf("guestkernel: %w", err)
	}
	work, err := os.MkdirTemp(cacheDir, ".fetch-"+pkg+"-")
	if err != nil {
		return fmt.Errorf("guestkernel: %w", err)
	}
	defer os.RemoveAll(work)
	// The work folder must be readable by apt's sandbox user, or apt-get falls back to downloading as root
	// with a warning.
	_ = os.Chmod(work, 0o755)
	if _, err := run(ctx, work, "apt-get", "download", "-q", pkg); err != nil {
		return fmt.Errorf("guestkernel: cannot fetch kernel package %s: %w", pkg, err)
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("guestkernel: apt-get download %s left %d .deb files: %w", pkg, len(debs), errdefs.ErrUnknown)
	}
	root := filepath.Join(work, "root")
	if _, err := run(ctx, work, "dpkg-deb", "-x", debs[0], root); err != nil {
		return fmt.Errorf("guestkernel: cannot unpack %s: %w", debs[0], err)
	}
	if err := os.Rename(root, final); err != nil {
		if _, statErr := os.Stat(final); statErr == nil {
			return nil // another caller finished first
		}
		return fmt.Errorf("guestkernel: %w", err)
	}
	return nil
}

// run runs a command in dir and returns its standard output; a failure carries the command's stderr.
func run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
