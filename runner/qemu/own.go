package qemu

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

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
// holes.
func copySparse(from string, out *os.File, size int64) error {
	in, err := os.Open(from)
	if err != nil {
		return fmt.Errorf("qemu: memory file: %w", err)
	}
	defer in.Close()
	buf := make([]byte, 1<<20)
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
