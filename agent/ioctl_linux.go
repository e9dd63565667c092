package agent

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The agent's ioctls: a pty's window size, the bytes waiting in a pipe or pty, and entropy for the kernel's RNG.

// setWinsize sets the window size of the pty whose master is f; the kernel sends SIGWINCH to its foreground group.
func setWinsize(f *os.File, rows, cols uint32) error {
	ws := &unix.Winsize{Row: uint16(min(rows, 0xffff)), Col: uint16(min(cols, 0xffff))}
	return control(f, func(fd int) error { return unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, ws) })
}

// pendingBytes is how many bytes wait to be read from f (a pipe or a pty master; TIOCINQ is FIONREAD); 0 when f
// is closed.
func pendingBytes(f *os.File) int {
	var n int
	if control(f, func(fd int) error {
		var err error
		n, err = unix.IoctlGetInt(fd, unix.TIOCINQ)
		return err
	}) != nil {
		return 0
	}
	return n
}

// control runs fn on f's descriptor without making f blocking (as f.Fd would).
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var fnErr error
	if err := rc.Control(func(fd uintptr) { fnErr = fn(int(fd)) }); err != nil {
		return err
	}
	return fnErr
}

// addEntropy adds seed to the kernel's entropy pool, credited in full (RNDADDENTROPY), and asks for the RNG to
// be reseeded from it now (RNDRESEEDCRNG) rather than at its next scheduled reseed. f is /dev/urandom or
// /dev/random; both need CAP_SYS_ADMIN.
func addEntropy(f *os.File, seed []byte) error {
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(seed)+3) // room to round buf up to whole __u32s
	binary.NativeEndian.PutUint32(info[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(seed)))
	copy(info[8:], seed)
	err := control(f, func(fd int) error {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0])))
		if errno != 0 {
			return errno
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("RNDADDENTROPY: %w", err)
	}
	// Kernels before 5.7 lack RNDRESEEDCRNG; the entropy credited above reseeds them soon anyway.
	_ = control(f, func(fd int) error { return unix.IoctlSetInt(fd, unix.RNDRESEEDCRNG, 0) })
	return nil
}
