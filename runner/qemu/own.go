package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/boxd-dev/boxd/memstore"
)

// ownMemory makes a new memory file of snapshot snap's size (size bytes)
// for one machine and returns it with fill, which writes the snapshot's
// memory into it: a copy of the snapshot's frozen file when there is one,
// else rebuilt from the store. fill may run while QEMU starts on the
// file: QEMU does not touch a shared memory file until the guest runs.
func (r *Runner) ownMemory(snap string, size int64) (path string, fill func(context.Context) error, err error) {
	path, out, err := r.emptyMemory(snap, size)
	if err != nil {
		return "", nil, err
	}
	r.frozenMu.Lock()
	f := r.frozen[snap]
	if f != nil {
		f.refs++ // kept while it is copied
	}
	r.frozenMu.Unlock()
	fill = func(ctx context.Context) error {
		defer out.Close()
		if f != nil {
			defer r.release(f.path)
			return copySparse(f.path, out, size)
		}
		if err := r.committed(ctx, snap); err != nil {
			return err
		}
		mr, err := r.Graph.OpenMap(snap, memstore.DefaultMap)
		if err != nil {
			return fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
		}
		if err := mr.ExportInto(ctx, out, nil); err != nil {
			return fmt.Errorf("qemu: memory of snapshot %q: %w", snap, err)
		}
		return nil
	}
	return path, fill, nil
}

// emptyMemory makes a new memory file of size bytes, all holes, for one
// machine restored from snapshot snap.
func (r *Runner) emptyMemory(snap string, size int64) (string, *os.File, error) {
	if err := os.MkdirAll(r.memDir(), 0o700); err != nil {
		return "", nil, fmt.Errorf("qemu: memory folder: %w", err)
	}
	path := filepath.Join(r.memDir(), fmt.Sprintf("own-%d-%d-%s.mem", os.Getpid(), r.ids.Add(1), snap))
	out, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", nil, fmt.Errorf("qemu: memory file: %w", err)
	}
	if err := out.Truncate(size); err != nil {
		_ = out.Close()
		_ = os.Remove(path)
		return "", nil, fmt.Errorf("qemu: memory file: %w", err)
	}
	return path, out, nil
}

// copySparse copies the size bytes of file from into out, a file of
// that size holding zeros: only the runs that hold data, so holes stay
// holes. The kernel copies them (copy_file_range), which on tmpfs saves
// the trip through a buffer (about a fifth of the time here); where it
// cannot, they go through one.
func copySparse(from string, out *os.File, size int64) error {
	in, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("qemu: memory file: %w", err)
	}
	defer in.Close()
	inKernel := true
	var buf []byte
	for off := int64(0); off < size; {
		start, err := seekData(in, off)
		if err != nil {
			return err
		}
		if start < 0 || start >= size {
			return nil
		}
		end, err := seekHole(in, start)
		if err != nil {
			return err
		}
		end = min(end, size)
		for p := start; p < end; {
			if inKernel {
				n, err := kernelCopy(in, out, p, end-p)
				if err == nil {
					p += n
					continue
				}
				if !errors.Is(err, errNoCopyRange) {
					return fmt.Errorf("qemu: copying memory file %s: %w", from, err)
				}
				inKernel, buf = false, make([]byte, 1<<20)
			}
			n := min(int64(len(buf)), end-p)
			if _, err := in.ReadAt(buf[:n], p); err != nil && err != io.EOF {
				return fmt.Errorf("qemu: copying memory file %s: %w", from, err)
			}
			if _, err := out.WriteAt(buf[:n], p); err != nil {
				return fmt.Errorf("qemu: copying memory file %s: %w", from, err)
			}
			p += n
		}
		off = end
	}
	return nil
}

// kernelCopy is copyRange (a variable for tests).
var kernelCopy = copyRange

// errNoCopyRange says the kernel cannot copy between the two files itself.
var errNoCopyRange = errors.New("no copy_file_range between these files")

// copyRange copies up to n bytes at offset off of in to the same offset of out in the kernel and returns how
// many it copied (at least one); errNoCopyRange where the files or the kernel do not allow it.
func copyRange(in, out *os.File, off, n int64) (int64, error) {
	src, dst := off, off
	c, err := unix.CopyFileRange(int(in.Fd()), &src, int(out.Fd()), &dst, int(min(n, 64<<20)), 0)
	switch {
	case errors.Is(err, unix.ENOSYS), errors.Is(err, unix.EXDEV), errors.Is(err, unix.EINVAL), errors.Is(err, unix.EOPNOTSUPP):
		return 0, errNoCopyRange
	case err != nil:
		return 0, err
	case c == 0:
		return 0, fmt.Errorf("copy_file_range copied nothing at %d: %w", off, io.ErrUnexpectedEOF)
	}
	return int64(c), nil
}

// seedSums makes m's page sums those of its memory file as it is now,
// before the guest runs: its first snapshot then stores only the pages
// the guest changes, not every page that holds data.
func (m *Machine) seedSums() error {
	f, err := os.Open(m.memFile)
	if err != nil {
		return fmt.Errorf("qemu: memory file: %w", err)
	}
	defer f.Close()
	data, err := dataPages(m.memFile, m.spec.MemSize)
	if err != nil {
		return err
	}
	sums := newPageSums(int(m.spec.MemSize / memstore.PageSize))
	_, keep, err := sums.changed(f, data)
	if err != nil {
		return err
	}
	keep()
	m.sums = sums
	return nil
}
