// Package kvm wraps the /dev/kvm ioctls boxd's micro-VMM uses: a VM with
// memory slots and a dirty log, and vCPUs with their register state. Raw
// ioctls and the kernel ABI mirrors live in ioctl_unsafe.go and abi_amd64.go.
package kvm

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/boxd-dev/boxd/errcat"
	"golang.org/x/sys/unix"
)

// Device is the KVM device.
const Device = "/dev/kvm"

// System is an open /dev/kvm.
type System struct {
	fd   int
	once sync.Once
}

// Open opens /dev/kvm and checks the API version.
func Open() (*System, error) {
	fd, err := unix.Open(Device, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, errcat.NotSupported("%s is missing (no KVM on this host)", Device)
		}
		return nil, fmt.Errorf("opening %s: %w", Device, err)
	}
	v, err := ioctlInt(fd, iocGetAPIVersion, 0)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: KVM_GET_API_VERSION: %w", Device, err)
	}
	if v != 12 {
		unix.Close(fd)
		return nil, errcat.NotSupported("%s: API version %d, want 12", Device, v)
	}
	return &System{fd: fd}, nil
}

// Close closes /dev/kvm.
func (s *System) Close() error {
	var err error
	s.once.Do(func() { err = unix.Close(s.fd) })
	return err
}

// VCPUMmapSize returns the size of a vCPU's shared kvm_run area.
func (s *System) VCPUMmapSize() (int, error) { return ioctlInt(s.fd, iocGetVCPUMmapSize, 0) }

// CheckExtension returns KVM_CHECK_EXTENSION's answer for cap.
func (s *System) CheckExtension(cap uintptr) int {
	v, _ := ioctlInt(s.fd, iocCheckExtension, cap)
	return v
}

// SupportedCPUID returns the CPUID entries KVM supports.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) { return getSupportedCPUID(s.fd) }

// MSRIndexList returns the MSRs KVM saves and restores.
func (s *System) MSRIndexList() ([]uint32, error) { return getMSRIndexList(s.fd) }

// VM is one virtual machine.
type VM struct {
	sys  *System
	fd   int
	once sync.Once
}

// CreateVM makes a VM.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctlInt(s.fd, iocCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	unix.CloseOnExec(fd)
	vm := &VM{sys: s, fd: fd}
	// Intel needs a TSS area below 4 GiB that guest memory avoids; AMD
	// ignores it.
	if _, err := ioctlInt(fd, iocSetTSSAddr, 0xfffbd000); err != nil {
		vm.Close()
		return nil, fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	return vm, nil
}

// Close closes the VM.
func (vm *VM) Close() error {
	var err error
	vm.once.Do(func() { err = unix.Close(vm.fd) })
	return err
}

// MemFlagLogDirty asks KVM to track writes to a slot (KVM_MEM_LOG_DIRTY_PAGES).
const MemFlagLogDirty = 1

// SetMemory maps host memory mem at guest physical address gpa as slot.
func (vm *VM) SetMemory(slot uint32, gpa uint64, mem []byte, flags uint32) error {
	if err := setUserMemoryRegion(vm.fd, slot, flags, gpa, mem); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d: %w", slot, err)
	}
	return nil
}

// DirtyLog returns, and clears, the bitmap of pages of slot written since
// the last call (bit n of word n/64 for page n).
func (vm *VM) DirtyLog(slot uint32, pages int) ([]uint64, error) {
	bitmap := make([]uint64, (pages+63)/64)
	if err := getDirtyLog(vm.fd, slot, bitmap); err != nil {
		return nil, fmt.Errorf("KVM_GET_DIRTY_LOG: %w", err)
	}
	return bitmap, nil
}

// VCPU is one virtual CPU and its shared kvm_run area.
type VCPU struct {
	vm   *VM
	fd   int
	run  []byte
	once sync.Once
}

// CreateVCPU makes vCPU id.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctlInt(vm.fd, iocCreateVCPU, uintptr(id))
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	unix.CloseOnExec(fd)
	size, err := vm.sys.VCPUMmapSize()
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mapping kvm_run: %w", err)
	}
	return &VCPU{vm: vm, fd: fd, run: run}, nil
}

// Close unmaps kvm_run and closes the vCPU.
func (c *VCPU) Close() error {
	var err error
	c.once.Do(func() {
		_ = unix.Munmap(c.run)
		err = unix.Close(c.fd)
	})
	return err
}

// Run enters the guest until the next exit and returns its reason. EINTR
// (a signal, or ImmediateExit) comes back as ExitIntr.
//
// Precondition: the calling goroutine is locked to its OS thread.
func (c *VCPU) Run() (ExitReason, error) {
	if _, err := ioctlInt(c.fd, iocRun, 0); err != nil {
		if errors.Is(err, unix.EINTR) {
			return ExitIntr, nil
		}
		return 0, fmt.Errorf("KVM_RUN: %w", err)
	}
	return c.exitReason(), nil
}

// ExitReason is kvm_run.exit_reason.
type ExitReason uint32

// Exit reasons from linux/kvm.h (ExitIntr is ours: KVM_RUN returned EINTR).
const (
	ExitUnknown       ExitReason = 0
	ExitIO            ExitReason = 2
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitInternalError ExitReason = 17
	ExitIntr          ExitReason = 1 << 31
)

func (r ExitReason) String() string {
	switch r {
	case ExitIO:
		return "io"
	case ExitHLT:
		return "hlt"
	case ExitMMIO:
		return "mmio"
	case ExitShutdown:
		return "shutdown (triple fault)"
	case ExitFailEntry:
		return "entry failed"
	case ExitInternalError:
		return "KVM internal error"
	case ExitIntr:
		return "interrupted"
	}
	return fmt.Sprintf("exit %d", uint32(r))
}

// IsSupported reports whether /dev/kvm exists and opens.
func IsSupported() error {
	if _, err := os.Stat(Device); err != nil {
		return errcat.NotSupported("%s is missing", Device)
	}
	s, err := Open()
	if err != nil {
		return err
	}
	return s.Close()
}
