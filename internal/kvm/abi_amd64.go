package kvm

// Regs mirrors struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment mirrors struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable mirrors struct kvm_dtable.
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs mirrors struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	InterruptBitmap         [4]uint64
}

// XSave mirrors struct kvm_xsave (the 4 KiB region).
type XSave struct {
	Region [1024]uint32
}

// MPState mirrors struct kvm_mp_state.
type MPState struct {
	State uint32
}

// VCPUEvents mirrors struct kvm_vcpu_events; boxd only saves and restores
// it, so its fields stay opaque.
type VCPUEvents struct {
	Raw [64]byte
}

// DebugRegs mirrors struct kvm_debugregs, opaque for the same reason.
type DebugRegs struct {
	Raw [128]byte
}

// MSR mirrors struct kvm_msr_entry.
type MSR struct {
	Index uint32
	_     uint32
	Data  uint64
}

// CPUIDEntry mirrors struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// userspaceMemoryRegion mirrors struct kvm_userspace_memory_region.
type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// dirtyLog mirrors struct kvm_dirty_log.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64 // a user pointer
}

// kvm_run offsets used (linux/kvm.h, x86-64).
const (
	runImmediateExit = 1
	runExitReason    = 8
	runIODirection   = 32
	runIOSize        = 33
	runIOPort        = 34
	runIOCount       = 36
	runIODataOffset  = 40
	runInternalSub   = 32
)

// ioctl numbers: _IOC(dir, 0xAE, nr, size).
const (
	iocGetAPIVersion       = 0xAE00
	iocCreateVM            = 0xAE01
	iocGetMSRIndexList     = 0xC004AE02
	iocCheckExtension      = 0xAE03
	iocGetVCPUMmapSize     = 0xAE04
	iocGetSupportedCPUID   = 0xC008AE05
	iocCreateVCPU          = 0xAE41
	iocGetDirtyLog         = 0x4010AE42
	iocSetUserMemoryRegion = 0x4020AE46
	iocSetTSSAddr          = 0xAE47
	iocRun                 = 0xAE80
	iocGetRegs             = 0x8090AE81
	iocSetRegs             = 0x4090AE82
	iocGetSregs            = 0x8138AE83
	iocSetSregs            = 0x4138AE84
	iocGetMSRs             = 0xC008AE88
	iocSetMSRs             = 0x4008AE89
	iocSetCPUID2           = 0x4008AE90
	iocGetMPState          = 0x8004AE98
	iocSetMPState          = 0x4004AE99
	iocGetVCPUEvents       = 0x8040AE9F
	iocSetVCPUEvents       = 0x4040AEA0
	iocGetDebugRegs        = 0x8080AEA1
	iocSetDebugRegs        = 0x4080AEA2
	iocGetXSave            = 0x9000AEA4
	iocSetXSave            = 0x5000AEA5
)
