package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers from linux/userfaultfd.h: _IOC(dir, 0xAA, nr, size).
const (
	iocNew        = 0xAA00     // USERFAULTFD_IOC_NEW: _IO(0xAA, 0x00)
	iocAPI        = 0xC018AA3F // UFFDIO_API: _IOWR(0xAA, 0x3F, struct uffdio_api)
	iocRegister   = 0xC020AA00 // UFFDIO_REGISTER: _IOWR(0xAA, 0x00, struct uffdio_register)
	iocUnregister = 0x8010AA01 // UFFDIO_UNREGISTER: _IOR(0xAA, 0x01, struct uffdio_range)
	iocWake       = 0x8010AA02 // UFFDIO_WAKE: _IOR(0xAA, 0x02, struct uffdio_range)
	iocCopy       = 0xC028AA03 // UFFDIO_COPY: _IOWR(0xAA, 0x03, struct uffdio_copy)
	iocZeropage   = 0xC020AA04 // UFFDIO_ZEROPAGE: _IOWR(0xAA, 0x04, struct uffdio_zeropage)

	apiVersion          = 0xAA // UFFD_API
	registerModeMissing = 1    // UFFDIO_REGISTER_MODE_MISSING
	eventPagefault      = 0x12 // UFFD_EVENT_PAGEFAULT
	pagefaultFlagWrite  = 1    // UFFD_PAGEFAULT_FLAG_WRITE
)

// uffdioAPI mirrors struct uffdio_api.
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// uffdioRange mirrors struct uffdio_range.
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// uffdioRegister mirrors struct uffdio_register.
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

// uffdioCopy mirrors struct uffdio_copy.
type uffdioCopy struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

// uffdioZeropage mirrors struct uffdio_zeropage.
type uffdioZeropage struct {
	Range    uffdioRange
	Mode     uint64
	Zeropage int64
}

// Msg mirrors struct uffd_msg for the page-fault event: event u8, three
// reserved fields, then the pagefault arm of the union (flags, address,
// feat.ptid) padded to 24 bytes.
type Msg struct {
	Event   uint8
	_       uint8
	_       uint16
	_       uint32
	Flags   uint64
	Address uint64
	Ptid    uint32
	_       uint32
}

func ioctl(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

// rawIoctl is ioctl without telling the Go scheduler, for the calls a
// fault handler makes per fault, which never block for long (UFFDIO_COPY,
// UFFDIO_ZEROPAGE, UFFDIO_WAKE): it saves the scheduler's bookkeeping
// around each of them.
func rawIoctl(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	r, _, errno := unix.RawSyscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return r, errno
	}
	return r, nil
}

func ioctlNew(dev int, flags int) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), iocNew, uintptr(flags))
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

func apiHandshake(fd int) (uint64, error) {
	a := uffdioAPI{API: apiVersion}
	if _, err := ioctl(fd, iocAPI, unsafe.Pointer(&a)); err != nil {
		return 0, err
	}
	return a.Features, nil
}

func register(fd int, start, length uintptr) error {
	r := uffdioRegister{Range: uffdioRange{uint64(start), uint64(length)}, Mode: registerModeMissing}
	_, err := ioctl(fd, iocRegister, unsafe.Pointer(&r))
	return err
}

func unregister(fd int, start, length uintptr) error {
	r := uffdioRange{uint64(start), uint64(length)}
	_, err := ioctl(fd, iocUnregister, unsafe.Pointer(&r))
	return err
}

func wake(fd int, start, length uintptr) error {
	r := uffdioRange{uint64(start), uint64(length)}
	_, err := rawIoctl(fd, iocWake, unsafe.Pointer(&r))
	return err
}

// copyPages issues one UFFDIO_COPY and returns the bytes it copied (the
// kernel reports partial progress in the copy field, even with an error).
func copyPages(fd int, dst, src, length uintptr) (uintptr, error) {
	c := uffdioCopy{Dst: uint64(dst), Src: uint64(src), Len: uint64(length)}
	_, err := rawIoctl(fd, iocCopy, unsafe.Pointer(&c))
	if c.Copy > 0 {
		return uintptr(c.Copy), err
	}
	return 0, err
}

func zeroPages(fd int, start, length uintptr) (uintptr, error) {
	z := uffdioZeropage{Range: uffdioRange{uint64(start), uint64(length)}}
	_, err := rawIoctl(fd, iocZeropage, unsafe.Pointer(&z))
	if z.Zeropage > 0 {
		return uintptr(z.Zeropage), err
	}
	return 0, err
}

// readMsgs reads as many messages as fit in buf. The descriptor is
// non-blocking, so the read is a raw system call (see rawIoctl).
func readMsgs(fd int, buf []Msg) (int, error) {
	if len(buf) == 0 {
		return 0, nil
	}
	n, _, errno := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf))*unsafe.Sizeof(Msg{}))
	if errno != 0 {
		return 0, errno
	}
	return int(n / unsafe.Sizeof(Msg{})), nil
}

// addr returns the address of the first byte of b.
func addr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// Addr returns the address of b's first byte, for Register and Copy.
func Addr(b []byte) uintptr { return addr(b) }
