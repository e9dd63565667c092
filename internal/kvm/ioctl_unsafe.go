package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"unsafe"

	"github.com/boxd-dev/boxd/errcat"
	"golang.org/x/sys/unix"
)

func ioctlInt(fd int, req, arg uintptr) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

func setUserMemoryRegion(fd int, slot, flags uint32, gpa uint64, mem []byte) error {
	r := userspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: uint64(len(mem))}
	if len(mem) > 0 {
		r.UserspaceAddr = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(mem))))
	}
	_, err := ioctlPtr(fd, iocSetUserMemoryRegion, unsafe.Pointer(&r))
	return err
}

func getDirtyLog(fd int, slot uint32, bitmap []uint64) error {
	d := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(unsafe.SliceData(bitmap))))}
	_, err := ioctlPtr(fd, iocGetDirtyLog, unsafe.Pointer(&d))
	return err
}

func getSupportedCPUID(fd int) ([]CPUIDEntry, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]byte, 8+n*int(unsafe.Sizeof(CPUIDEntry{})))
		binary.LittleEndian.PutUint32(buf, uint32(n))
		_, err := ioctlPtr(fd, iocGetSupportedCPUID, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		got := int(binary.LittleEndian.Uint32(buf))
		entries := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[8])), got)
		return append([]CPUIDEntry(nil), entries...), nil
	}
	return nil, errcat.NotSupported("KVM_GET_SUPPORTED_CPUID: too many entries")
}

func getMSRIndexList(fd int) ([]uint32, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, err := ioctlPtr(fd, iocGetMSRIndexList, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: %w", err)
		}
		return append([]uint32(nil), buf[1:1+buf[0]]...), nil
	}
	return nil, errcat.NotSupported("KVM_GET_MSR_INDEX_LIST: too many entries")
}

// SetCPUID sets the vCPU's CPUID table.
func (c *VCPU) SetCPUID(entries []CPUIDEntry) error {
	size := int(unsafe.Sizeof(CPUIDEntry{}))
	buf := make([]byte, 8+len(entries)*size)
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	if len(entries) > 0 {
		copy(buf[8:], unsafe.Slice((*byte)(unsafe.Pointer(&entries[0])), len(entries)*size))
	}
	if _, err := ioctlPtr(c.fd, iocSetCPUID2, unsafe.Pointer(&buf[0])); err != nil {
		return fmt.Errorf("KVM_SET_CPUID2: %w", err)
	}
	return nil
}

// get and set run one fixed-size state ioctl.
func (c *VCPU) get(req uintptr, p unsafe.Pointer, name string) error {
	if _, err := ioctlPtr(c.fd, req, p); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// Regs returns the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	return r, c.get(iocGetRegs, unsafe.Pointer(&r), "KVM_GET_REGS")
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error { return c.get(iocSetRegs, unsafe.Pointer(&r), "KVM_SET_REGS") }

// Sregs returns the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	return s, c.get(iocGetSregs, unsafe.Pointer(&s), "KVM_GET_SREGS")
}

// SetSregs sets the special registers.
func (c *VCPU) SetSregs(s Sregs) error {
	return c.get(iocSetSregs, unsafe.Pointer(&s), "KVM_SET_SREGS")
}

// XSave returns the extended FPU state.
func (c *VCPU) XSave() (XSave, error) {
	var x XSave
	return x, c.get(iocGetXSave, unsafe.Pointer(&x), "KVM_GET_XSAVE")
}

// SetXSave sets the extended FPU state.
func (c *VCPU) SetXSave(x XSave) error {
	return c.get(iocSetXSave, unsafe.Pointer(&x), "KVM_SET_XSAVE")
}

// MPState returns the multiprocessing state.
func (c *VCPU) MPState() (MPState, error) {
	var m MPState
	return m, c.get(iocGetMPState, unsafe.Pointer(&m), "KVM_GET_MP_STATE")
}

// SetMPState sets the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	return c.get(iocSetMPState, unsafe.Pointer(&m), "KVM_SET_MP_STATE")
}

// Events returns pending exceptions, interrupts and NMIs.
func (c *VCPU) Events() (VCPUEvents, error) {
	var e VCPUEvents
	return e, c.get(iocGetVCPUEvents, unsafe.Pointer(&e), "KVM_GET_VCPU_EVENTS")
}

// SetEvents sets pending exceptions, interrupts and NMIs.
func (c *VCPU) SetEvents(e VCPUEvents) error {
	return c.get(iocSetVCPUEvents, unsafe.Pointer(&e), "KVM_SET_VCPU_EVENTS")
}

// DebugRegs returns the debug registers.
func (c *VCPU) DebugRegs() (DebugRegs, error) {
	var d DebugRegs
	return d, c.get(iocGetDebugRegs, unsafe.Pointer(&d), "KVM_GET_DEBUGREGS")
}

// SetDebugRegs sets the debug registers.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	return c.get(iocSetDebugRegs, unsafe.Pointer(&d), "KVM_SET_DEBUGREGS")
}

// msrBuffer makes a struct kvm_msrs for n entries: an 8-byte header
// (nmsrs, then padding) followed by the entries, which it returns for the
// caller to fill, with the pointer to pass to KVM.
func msrBuffer(n int) (unsafe.Pointer, []MSR) {
	words := make([]uint64, 1+2*n) // uint64s keep the entries 8-byte aligned
	*(*uint32)(unsafe.Pointer(&words[0])) = uint32(n)
	return unsafe.Pointer(&words[0]), unsafe.Slice((*MSR)(unsafe.Pointer(&words[1])), n)
}

// MSRs reads the listed MSRs.
func (c *VCPU) MSRs(indices []uint32) ([]MSR, error) {
	if len(indices) == 0 {
		return nil, nil
	}
	p, entries := msrBuffer(len(indices))
	for i, idx := range indices {
		entries[i].Index = idx
	}
	n, err := ioctlPtr(c.fd, iocGetMSRs, p)
	if err != nil {
		return nil, fmt.Errorf("KVM_GET_MSRS: %w", err)
	}
	return append([]MSR(nil), entries[:n]...), nil
}

// SetMSR writes one MSR, and says so when KVM refuses it.
func (c *VCPU) SetMSR(m MSR) error {
	n, err := c.SetMSRs([]MSR{m})
	if err != nil {
		return fmt.Errorf("KVM_SET_MSRS %#x: %w", m.Index, err)
	}
	if n != 1 {
		return errcat.NotSupported("KVM_SET_MSRS %#x: refused", m.Index)
	}
	return nil
}

// SetMSRs writes ms in order with one KVM_SET_MSRS, which stops at the
// first MSR KVM refuses: it returns how many it set, ms[n] being the one
// refused when n < len(ms).
func (c *VCPU) SetMSRs(ms []MSR) (int, error) {
	if len(ms) == 0 {
		return 0, nil
	}
	p, entries := msrBuffer(len(ms))
	copy(entries, ms)
	n, err := ioctlPtr(c.fd, iocSetMSRs, p)
	if err != nil {
		return 0, fmt.Errorf("KVM_SET_MSRS: %w", err)
	}
	return n, nil
}

// SetImmediateExit sets kvm_run.immediate_exit: KVM_RUN returns EINTR at
// once (after completing pending I/O) while it is set.
func (c *VCPU) SetImmediateExit(on bool) {
	v := byte(0)
	if on {
		v = 1
	}
	c.run[runImmediateExit] = v
}

func (c *VCPU) exitReason() ExitReason {
	return ExitReason(binary.LittleEndian.Uint32(c.run[runExitReason:]))
}

// IO describes a port I/O exit. Data is the kvm_run buffer to read (OUT) or
// fill (IN): Size bytes for each of Count repetitions.
type IO struct {
	In    bool
	Size  int
	Port  uint16
	Count int
	Data  []byte
}

// IO returns the port I/O of the last ExitIO.
func (c *VCPU) IO() IO {
	io := IO{
		In:    c.run[runIODirection] == 0,
		Size:  int(c.run[runIOSize]),
		Port:  binary.LittleEndian.Uint16(c.run[runIOPort:]),
		Count: int(binary.LittleEndian.Uint32(c.run[runIOCount:])),
	}
	off := binary.LittleEndian.Uint64(c.run[runIODataOffset:])
	if n := uint64(io.Size * io.Count); off+n <= uint64(len(c.run)) {
		io.Data = c.run[off : off+n]
	}
	return io
}

// InternalSuberror returns kvm_run.internal.suberror after ExitInternalError.
func (c *VCPU) InternalSuberror() uint32 {
	return binary.LittleEndian.Uint32(c.run[runInternalSub:])
}
