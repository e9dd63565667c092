// Package uffd wraps Linux userfaultfd: a descriptor through which one thread
// serves the page faults of a registered memory range.
//
// Only MISSING mode is used: the kernel reports the first touch of each page
// and the handler fills it with Copy (UFFDIO_COPY) or ZeroPage
// (UFFDIO_ZEROPAGE). Raw ioctls and the ABI mirrors live in ioctl_unsafe.go.
package uffd

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/boxd-dev/boxd/errcat"
	"golang.org/x/sys/unix"
)

// FD is an owned userfaultfd descriptor. It closes itself once.
type FD struct {
	fd       int
	features uint64
	once     sync.Once
	closeErr error
}

// New creates a userfaultfd for this process: through /dev/userfaultfd
// (USERFAULTFD_IOC_NEW) where it exists, else the userfaultfd syscall. The
// descriptor is non-blocking (the kernel's poll reports an error on a
// blocking one) and close-on-exec, and the API handshake is done.
func New() (*FD, error) {
	fd, err := openDevice()
	if err != nil {
		var serr error
		fd, serr = newBySyscall()
		if serr != nil {
			return nil, errcat.NotSupported("userfaultfd not supported: /dev/userfaultfd: %w; syscall: %w", err, serr)
		}
	}
	u := &FD{fd: fd}
	features, err := apiHandshake(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("UFFDIO_API: %w", err)
	}
	u.features = features
	return u, nil
}

// FromFile adopts a userfaultfd received from another process (whose API
// handshake that process has done).
func FromFile(f *os.File) (*FD, error) {
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("dup userfaultfd: %w", err)
	}
	unix.CloseOnExec(fd)
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("userfaultfd: %w", err)
	}
	return &FD{fd: fd}, nil
}

func openDevice() (int, error) {
	dev, err := unix.Open("/dev/userfaultfd", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(dev)
	return ioctlNew(dev, unix.O_CLOEXEC|unix.O_NONBLOCK)
}

func newBySyscall() (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC|unix.O_NONBLOCK, 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// Fd returns the raw descriptor, for handing to another process.
func (u *FD) Fd() int { return u.fd }

// Features returns the features the kernel reported in the handshake.
func (u *FD) Features() uint64 { return u.features }

// Close closes the descriptor. Threads waiting on faults in registered
// ranges are woken and the ranges behave as plain memory from then on.
func (u *FD) Close() error {
	u.once.Do(func() { u.closeErr = unix.Close(u.fd) })
	return u.closeErr
}

// Register registers [start, start+length) in MISSING mode.
func (u *FD) Register(start, length uintptr) error {
	if err := register(u.fd, start, length); err != nil {
		return fmt.Errorf("UFFDIO_REGISTER %#x+%#x: %w", start, length, err)
	}
	return nil
}

// Unregister stops serving faults in [start, start+length).
func (u *FD) Unregister(start, length uintptr) error {
	if err := unregister(u.fd, start, length); err != nil {
		return fmt.Errorf("UFFDIO_UNREGISTER: %w", err)
	}
	return nil
}

// Copy fills the missing pages of [dst, dst+length) from src and wakes the
// threads waiting on them. Pages already present are skipped (EEXIST), and
// EAGAIN (the address space changing under us) is retried. It returns the
// bytes it copied, which leaves out the pages skipped.
func (u *FD) Copy(dst, src, length uintptr) (uintptr, error) {
	var done, copied uintptr
	for done < length {
		n, err := copyPages(u.fd, dst+done, src+done, length-done)
		if n > 0 {
			done += n
			copied += n
		}
		switch {
		case err == nil:
			if n <= 0 {
				return done, fmt.Errorf("UFFDIO_COPY made no progress at %#x", dst+done)
			}
		case errors.Is(err, unix.EEXIST):
			// The page is there already (filled by someone else); make
			// sure nobody still sleeps on it, and go on past it.
			_ = wake(u.fd, dst+done, pageSize)
			done += pageSize
		case errors.Is(err, unix.EAGAIN):
		default:
			return copied, fmt.Errorf("UFFDIO_COPY %#x+%#x: %w", dst+done, length-done, err)
		}
	}
	return copied, nil
}

// ZeroPage maps the zero page into the missing pages of [start,
// start+length) and wakes their waiters; present pages are skipped. It
// returns the bytes it mapped, which leaves out the pages skipped.
func (u *FD) ZeroPage(start, length uintptr) (uintptr, error) {
	var done, mapped uintptr
	for done < length {
		n, err := zeroPages(u.fd, start+done, length-done)
		if n > 0 {
			done += n
			mapped += n
		}
		switch {
		case err == nil:
			if n <= 0 {
				return mapped, fmt.Errorf("UFFDIO_ZEROPAGE made no progress at %#x", start+done)
			}
		case errors.Is(err, unix.EEXIST):
			_ = wake(u.fd, start+done, pageSize)
			done += pageSize
		case errors.Is(err, unix.EAGAIN):
		default:
			return mapped, fmt.Errorf("UFFDIO_ZEROPAGE %#x+%#x: %w", start+done, length-done, err)
		}
	}
	return mapped, nil
}

// Wake wakes threads waiting on faults in [start, start+length).
func (u *FD) Wake(start, length uintptr) error {
	if err := wake(u.fd, start, length); err != nil {
		return fmt.Errorf("UFFDIO_WAKE: %w", err)
	}
	return nil
}

// Fault is one page fault reported by the kernel.
type Fault struct {
	Address uintptr // the faulting address (not page-aligned)
	Write   bool
}

// ReadFaults reads the pending events and appends the page faults among
// them to out, using buf as scratch. With nothing pending it returns
// unix.EAGAIN: poll the descriptor first. A signal interrupting the read is
// retried.
func (u *FD) ReadFaults(buf []Msg, out []Fault) ([]Fault, error) {
	for {
		n, err := readMsgs(u.fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, m := range buf[:n] {
			if m.Event == eventPagefault {
				out = append(out, Fault{Address: uintptr(m.Address), Write: m.Flags&pagefaultFlagWrite != 0})
			}
		}
		return out, nil
	}
}

// pageSize is the base page size on amd64.
const pageSize = 4096
