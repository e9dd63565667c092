package kvm

import (
	"testing"
	"unsafe"
)

// The sizes of the kernel structs, as linux/kvm.h defines them on x86-64 and
// as the ioctl numbers encode them.
func TestABISizes(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
		ioc  uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144, iocGetRegs},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24, 0},
		{"kvm_dtable", unsafe.Sizeof(DTable{}), 16, 0},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312, iocGetSregs},
		{"kvm_xsave", unsafe.Sizeof(XSave{}), 4096, iocGetXSave},
		{"kvm_mp_state", unsafe.Sizeof(MPState{}), 4, iocGetMPState},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64, iocGetVCPUEvents},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128, iocGetDebugRegs},
		{"kvm_msr_entry", unsafe.Sizeof(MSR{}), 16, 0},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40, 0},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32, iocSetUserMemoryRegion},
		{"kvm_dirty_log", unsafe.Sizeof(dirtyLog{}), 16, iocGetDirtyLog},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("%s: %d bytes, want %d", tc.name, tc.got, tc.want)
		}
		if tc.ioc != 0 && (tc.ioc>>16)&0x3fff != tc.want {
			t.Errorf("%s: ioctl %#x encodes %d bytes, want %d", tc.name, tc.ioc, (tc.ioc>>16)&0x3fff, tc.want)
		}
	}
	if off := unsafe.Offsetof(Sregs{}.GDT); off != 192 {
		t.Errorf("kvm_sregs.gdt at %d, want 192", off)
	}
	if off := unsafe.Offsetof(Sregs{}.CR0); off != 224 {
		t.Errorf("kvm_sregs.cr0 at %d, want 224", off)
	}
}
