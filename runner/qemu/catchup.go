package qemu

import (
	"bytes"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/boxd-dev/boxd/memstore"
)

// catchUp makes file to, a copy of memory file from taken while its guest
// ran, equal to from as it is now (the guest stopped): it compares every
// page that holds data in from, mapped, and writes those that differ. It
// returns how many it wrote. Pages from gave back to holes are not looked
// at: QEMU does not punch holes in guest memory. (Reading both files
// through buffers is faster here than comparing them mapped: the mapping's
// page faults cost more than the copies.)
func catchUp(from, to string, size int64) (int, error) {
	src, err := os.Open(from)
	if err != nil {
		return 0, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_RDWR, 0)
	if err != nil {
		return 0, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer dst.Close()
	// Runs of up to 1 MiB of data, compared by two workers: the guest is
	// stopped, so the CPUs are free.
	type item struct{ off, n int64 }
	work := make(chan item, 16)
	var written atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for range 2 {
		wg.Go(func() {
			a, b := make([]byte, copyRun), make([]byte, copyRun)
			for it := range work {
				if err := catchUpRun(src, dst, a[:it.n], b[:it.n], it.off, &written); err != nil {
					errs <- err
					for range work {
					}
					return
				}
			}
		})
	}
	var scanErr error
	for off := int64(0); off < size; {
		start, err := seekData(src, off)
		if err != nil {
			scanErr = err
			break
		}
		if start < 0 || start >= size {
			break
		}
		end, err := seekHole(src, start)
		if err != nil {
			scanErr = err
			break
		}
		end = min(end, size)
		for p := start; p < end; p += copyRun {
			work <- item{p, min(int64(copyRun), end-p)}
		}
		off = end
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return int(written.Load()), fmt.Errorf("qemu: catching %s up with %s: %w", to, from, err)
	default:
	}
	if scanErr != nil {
		return int(written.Load()), scanErr
	}
	return int(written.Load()), nil
}

const copyRun = 1 << 20

// catchUpRun compares the bytes at off of src and dst (len(a) of them,
// a and b being buffers of that size) and writes the pages of src that
// differ into dst.
func catchUpRun(src, dst *os.File, a, b []byte, off int64, written *atomic.Int64) error {
	if _, err := src.ReadAt(a, off); err != nil {
		return err
	}
	if _, err := dst.ReadAt(b, off); err != nil {
		return err
	}
	if bytes.Equal(a, b) {
		return nil
	}
	n := int64(len(a))
	for q := int64(0); q < n; q += memstore.PageSize {
		r := min(q+memstore.PageSize, n)
		if !bytes.Equal(a[q:r], b[q:r]) {
			if _, err := dst.WriteAt(a[q:r], off+q); err != nil {
				return err
			}
			written.Add(1)
		}
	}
	return nil
}
