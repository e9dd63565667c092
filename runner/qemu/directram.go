package qemu

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/memstore"
)

// directRAM places pages straight into the guest RAM of a QEMU that
// restores as a postcopy destination, through QEMU's own userfaultfd
// (taken from it with pidfd_getfd): one UFFDIO_COPY for a run of pages,
// where the migration stream costs QEMU a read and an ioctl for each page.
// Pages placed this way never go through the stream, and pages the stream
// carried are never placed (QEMU refuses a page it has), so the writer
// alone decides which way each page goes (lazyMemory.sent). A page QEMU
// asks for after it was placed is there already: the placement woke the
// thread that faulted on it, and the request is skipped as one on its way.
type directRAM struct {
	fd   *uffd.FD
	base uintptr // guest RAM's first address in QEMU
	size int64
}

// userfaultfdLink is what /proc/PID/fd shows for a userfaultfd.
const userfaultfdLink = "anon_inode:[userfaultfd]"

// grabDirectRAM takes the userfaultfd of QEMU pid, which registered its
// mapping of memFile (size bytes) for a postcopy restore. It fails unless
// QEMU holds exactly one userfaultfd.
func grabDirectRAM(pid int, memFile string, size int64) (*directRAM, error) {
	ram, err := findGuestRAM(pid, memFile, size)
	if err != nil {
		return nil, err
	}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("qemu: descriptors of QEMU %d: %w", pid, err)
	}
	target := -1
	for _, e := range entries {
		if link, err := os.Readlink(dir + "/" + e.Name()); err != nil || link != userfaultfdLink {
			continue
		}
		if target >= 0 {
			return nil, fmt.Errorf("qemu: QEMU %d holds more than one userfaultfd", pid)
		}
		if target, err = strconv.Atoi(e.Name()); err != nil {
			return nil, fmt.Errorf("qemu: descriptor %q of QEMU %d: %w", e.Name(), pid, err)
		}
	}
	if target < 0 {
		return nil, fmt.Errorf("qemu: QEMU %d holds no userfaultfd", pid)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)
	fd, err := unix.PidfdGetfd(pidfd, target, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: pidfd_getfd %d of QEMU %d: %w", target, pid, err)
	}
	f := os.NewFile(uintptr(fd), "userfaultfd")
	defer f.Close()
	// FromFile keeps the descriptor non-blocking, as QEMU opened it.
	u, err := uffd.FromFile(f)
	if err != nil {
		return nil, fmt.Errorf("qemu: userfaultfd of QEMU %d: %w", pid, err)
	}
	return &directRAM{fd: u, base: uintptr(ram.base), size: size}, nil
}

// errPlacedAlready says a page to place was in guest RAM already, which
// the writer's bookkeeping rules out.
var errPlacedAlready = errors.New("a page was in guest RAM already")

// place copies data, whole pages, into guest RAM from page first on, and
// wakes any thread that faulted on them.
func (d *directRAM) place(first int, data []byte) error {
	n := uintptr(len(data))
	if int64(first)*memstore.PageSize+int64(n) > d.size {
		return fmt.Errorf("qemu: pages %d+%d lie beyond guest RAM", first, n/memstore.PageSize)
	}
	done, err := d.fd.Copy(d.base+uintptr(first)*memstore.PageSize, uffd.Addr(data), n)
	if err != nil {
		return fmt.Errorf("qemu: placing pages %d+%d: %w", first, n/memstore.PageSize, err)
	}
	if done != n {
		return fmt.Errorf("qemu: placing pages %d+%d: %w", first, n/memstore.PageSize, errPlacedAlready)
	}
	return nil
}

func (d *directRAM) close() { _ = d.fd.Close() }
