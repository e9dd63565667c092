package main

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"
)

// ensureRootfs returns the Debian bookworm minbase root filesystem cached in
// cache/debootstrap-bookworm, making it with debootstrap first if it is not
// there. The cache is shared with boxd's integration tests: the same lock
// file (flock on debootstrap-bookworm.lock), the same .partial folder and
// .complete marker. The lock is held until unlock is called, so that the
// tree does not change while it is read.
func ensureRootfs(ctx context.Context, cache, mirror string, cl *cleaner) (dir string, unlock func(), err error) {
	dir = filepath.Join(cache, "debootstrap-bookworm")
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", nil, err
	}
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", nil, err
	}
	unlock = func() { lock.Close() } // closing the file releases the lock
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
		benchkit.Progress("waiting for %s (another process is building the Debian root filesystem)", dir+".lock")
		err = unix.Flock(int(lock.Fd()), unix.LOCK_EX)
		if err != nil {
			unlock()
			return "", nil, err
		}
	} else if err != nil {
		unlock()
		return "", nil, err
	}
	if st, err := os.Stat(dir); err == nil && st.IsDir() {
		if _, err := os.Stat(filepath.Join(dir, "usr/bin/dpkg")); err != nil {
			unlock()
			return "", nil, fmt.Errorf("%s exists but holds no Debian root filesystem (no usr/bin/dpkg); remove it to have it rebuilt", dir)
		}
		benchkit.Progress("Debian root filesystem: cached in %s", dir)
		return dir, unlock, nil
	}
	if err := buildRootfs(ctx, dir, mirror, cl); err != nil {
		unlock()
		return "", nil, err
	}
	return dir, unlock, nil
}

// buildRootfs runs debootstrap --variant=minbase bookworm into dir.partial
// and renames it into place.
func buildRootfs(ctx context.Context, dir, mirror string, cl *cleaner) error {
	deb, err := findDebootstrap(ctx)
	if err != nil {
		return err
	}
	partial := dir + ".partial"
	cl.addUnmount(partial)
	// A run that stopped half-way can leave /proc and /sys mounted in it.
	if err := unmountUnder(partial); err != nil {
		return fmt.Errorf("clearing %s: %w", partial, err)
	}
	if err := os.RemoveAll(partial); err != nil {
		return err
	}
	benchkit.Progress("Debian root filesystem: debootstrap --variant=minbase bookworm from %s into %s (first run only; a few minutes)", mirror, partial)
	start := time.Now()
	cmd := exec.CommandContext(ctx, deb, "--variant=minbase", "bookworm", partial, mirror)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	if uerr := unmountUnder(partial); uerr != nil {
		err = errors.Join(err, uerr)
	}
	if err != nil {
		return fmt.Errorf("debootstrap --variant=minbase bookworm %s %s: %w\n%s", partial, mirror, err, tail(out.String(), 20))
	}
	if err := os.Rename(partial, dir); err != nil {
		return err
	}
	if err := os.WriteFile(dir+".complete", nil, 0o644); err != nil {
		return err
	}
	benchkit.Progress("Debian root filesystem: debootstrap took %v", time.Since(start).Round(time.Second))
	return nil
}

// findDebootstrap returns debootstrap's path, installing Debian's package
// if it is missing.
func findDebootstrap(ctx context.Context) (string, error) {
	look := func() (string, error) {
		if p, err := exec.LookPath("debootstrap"); err == nil {
			return p, nil
		}
		if _, err := os.Stat("/usr/sbin/debootstrap"); err == nil {
			return "/usr/sbin/debootstrap", nil
		}
		return "", errors.New("debootstrap not found")
	}
	if p, err := look(); err == nil {
		return p, nil
	}
	benchkit.Progress("installing Debian's debootstrap")
	apt := func(args ...string) error {
		// Another apt-get may hold dpkg's lock: wait for it.
		cmd := exec.CommandContext(ctx, "apt-get", append([]string{"-o", "DPkg::Lock::Timeout=600", "-y", "-q"}, args...)...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("apt-get %s: %w\n%s", strings.Join(args, " "), err, tail(string(out), 10))
		}
		return nil
	}
	if err := apt("install", "debootstrap"); err != nil {
		if uerr := apt("update"); uerr != nil {
			return "", errors.Join(err, uerr)
		}
		if err := apt("install", "debootstrap"); err != nil {
			return "", err
		}
	}
	return look()
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}

// layers are the layer tars the run unpacks, in memory.
type layers struct {
	// full is the whole root filesystem as one layer.
	full []byte
	// lower and upper are the same root filesystem as two layers: all
	// but /etc, then /etc.
	lower, upper []byte
	// tops are the small top layers of the images that share the base
	// full: each adds its own 1 MiB file of random bytes and changes one
	// existing file.
	tops [][]byte

	entries, upperEntries int
	contentBytes          int64 // regular files' bytes in full
}

// modifiedFiles are the files of the base the top layers change, one each.
var modifiedFiles = []string{"etc/hostname", "etc/motd", "etc/issue", "etc/issue.net", "etc/debian_version"}

const (
	addedFileBytes = 1 << 20
	addedFileDir   = "usr/local/share"
)

// buildLayers makes the layers from rootfs, with containerd's own tar
// writer (archive.WriteDiff against nothing, as containerd's differ does
// for a first layer).
func buildLayers(ctx context.Context, rootfs string, images int) (*layers, error) {
	var full bytes.Buffer
	if err := archive.WriteDiff(ctx, &full, "", rootfs); err != nil {
		return nil, fmt.Errorf("writing the root filesystem's layer: %w", err)
	}
	l := &layers{full: full.Bytes()}
	var lower, upper bytes.Buffer
	lw, uw := tar.NewWriter(&lower), tar.NewWriter(&upper)
	tr := tar.NewReader(bytes.NewReader(l.full))
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading the root filesystem's layer: %w", err)
		}
		l.entries++
		if hdr.Typeflag == tar.TypeReg {
			l.contentBytes += hdr.Size
		}
		// A hard link goes with its target's layer or later.
		w := lw
		if inEtc(hdr.Name) || hdr.Typeflag == tar.TypeLink && inEtc(hdr.Linkname) {
			w = uw
			l.upperEntries++
		}
		if err := w.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := io.Copy(w, tr); err != nil {
			return nil, err
		}
	}
	if err := lw.Close(); err != nil {
		return nil, err
	}
	if err := uw.Close(); err != nil {
		return nil, err
	}
	if l.upperEntries == 0 {
		return nil, fmt.Errorf("the root filesystem in %s has no /etc", rootfs)
	}
	l.lower, l.upper = lower.Bytes(), upper.Bytes()

	if images > len(modifiedFiles) {
		return nil, fmt.Errorf("at most %d images", len(modifiedFiles))
	}
	for i := range images {
		top, err := topLayer(rootfs, i+1, modifiedFiles[i])
		if err != nil {
			return nil, fmt.Errorf("top layer of image %d: %w", i+1, err)
		}
		l.tops = append(l.tops, top)
	}
	return l, nil
}

func inEtc(name string) bool {
	n := strings.TrimPrefix(strings.TrimPrefix(name, "./"), "/")
	return n == "etc" || strings.HasPrefix(n, "etc/")
}

// topLayer is image n's layer: its parent folders as they are in the base,
// the base's file modified with a line appended, and a new 1 MiB file of
// random bytes (seeded by n, so no two images share its blocks).
func topLayer(rootfs string, n int, modified string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	added := fmt.Sprintf("%s/boxd-bench-image-%d.bin", addedFileDir, n)
	dirs := []string{"etc", "usr", "usr/local", addedFileDir}
	for _, d := range dirs {
		fi, err := os.Lstat(filepath.Join(rootfs, d))
		if err != nil {
			return nil, err
		}
		hdr, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return nil, err
		}
		hdr.Name = d + "/"
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
	}
	path := filepath.Join(rootfs, modified)
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	old, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	old = append(old, fmt.Sprintf("changed by boxd's snapshotter benchmark, image %d\n", n)...)
	hdr, err := tar.FileInfoHeader(fi, "")
	if err != nil {
		return nil, err
	}
	content := old
	hdr.Name, hdr.Size, hdr.ModTime = modified, int64(len(content)), time.Unix(1700000000+int64(n), 0)
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(content); err != nil {
		return nil, err
	}
	random := make([]byte, addedFileBytes)
	var seed [32]byte
	copy(seed[:], fmt.Sprintf("boxd snapshotter bench %d", n))
	rand.NewChaCha8(seed).Read(random) //nolint:errcheck // ChaCha8.Read never fails
	hdr = &tar.Header{
		Typeflag: tar.TypeReg, Name: added, Mode: 0o644, Size: addedFileBytes,
		ModTime: time.Unix(1700000000+int64(n), 0), Format: tar.FormatPAX,
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(random); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
