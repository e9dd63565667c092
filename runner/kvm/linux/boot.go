// Package linux loads a Linux kernel into guest memory for boxd's own VMM,
// following the x86 64-bit boot protocol (Documentation/arch/x86/boot.rst):
// the protected-mode part of a bzImage at its preferred address, a zero page
// (struct boot_params) with the setup header, an e820 memory map, the
// command line and an initrd; the vCPU then enters startup_64 in long mode
// with RSI pointing at the zero page.
//
// The rest of the path for Linux guests, which needs hardware
// virtualisation (vmx/svm) to test and so is not built yet:
//
//   - an in-kernel irqchip and PIT (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2),
//     and a VMM that answers the legacy ports Linux probes (PIC, PIT, CMOS,
//     the 8250 UART at 0x3f8 with an IRQ) instead of failing on them;
//   - virtio-mmio devices (block for the root disk, console for the agent,
//     net): each a 4 KiB register window at 0xd0000000 + n*0x1000 in a
//     region no memory slot covers, so accesses exit as KVM_EXIT_MMIO,
//     announced on the command line as virtio_mmio.device=4K@ADDR:IRQ,
//     interrupts raised with KVM_IRQ_LINE (or irqfd);
//   - snapshots then add the irqchip (KVM_GET_IRQCHIP), PIT, clock
//     (KVM_GET_CLOCK) and each device's queue state to the machine state.
package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Addresses in guest memory this loader uses.
const (
	ZeroPage    = 0x7000   // struct boot_params
	CmdlineAddr = 0x20000  // the command line
	KernelAddr  = 0x100000 // where a kernel without a preferred address goes
	maxCmdline  = 0x10000
)

// ErrNotBzImage says the file is not a kernel this loader understands.
var ErrNotBzImage = errors.New("not a bzImage")

// Offsets in the setup header (struct setup_header, at 0x1f1 of a bzImage
// and of the zero page).
const (
	hdrSetupSects     = 0x1f1
	hdrBootFlag       = 0x1fe
	hdrMagic          = 0x202
	hdrVersion        = 0x206
	hdrTypeOfLoader   = 0x210
	hdrLoadFlags      = 0x211
	hdrRamdiskImage   = 0x218
	hdrRamdiskSize    = 0x21c
	hdrCmdLinePtr     = 0x228
	hdrInitrdMax      = 0x22c
	hdrAlignment      = 0x230
	hdrRelocatable    = 0x234
	hdrXLoadFlags     = 0x236
	hdrCmdlineSize    = 0x238
	hdrPrefAddress    = 0x258
	hdrInitSize       = 0x260
	hdrEnd            = 0x268 // end of the header as of protocol 2.12+
	zpE820Entries     = 0x1e8
	zpE820Table       = 0x2d0
	e820Max           = 128
	xlfKernel64       = 1 << 0 // XLF_KERNEL_64: has the 64-bit entry at +0x200
	loadedHigh        = 1 << 0 // LOADED_HIGH
	canUseHeap        = 1 << 7
	minProtocol       = 0x20c // 2.12: xloadflags, 64-bit entry
	e820RAM           = 1
	e820Reserved      = 2
	typeOfLoaderUndef = 0xff
)

// Kernel is a parsed bzImage.
type Kernel struct {
	Version   uint16 // boot protocol version
	setup     []byte // the real-mode part (setup header included)
	protected []byte // the protected-mode part, loaded at LoadAddr
	LoadAddr  uint64
	InitSize  uint64 // memory the kernel needs from LoadAddr while it decompresses
	initrdMax uint64
}

// Parse reads a bzImage.
func Parse(b []byte) (*Kernel, error) {
	if len(b) < hdrEnd || binary.LittleEndian.Uint16(b[hdrBootFlag:]) != 0xaa55 || string(b[hdrMagic:hdrMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("no setup header: %w", ErrNotBzImage)
	}
	k := &Kernel{Version: binary.LittleEndian.Uint16(b[hdrVersion:])}
	if k.Version < minProtocol {
		return nil, fmt.Errorf("boot protocol %#x is older than 2.12: %w", k.Version, ErrNotBzImage)
	}
	if b[hdrLoadFlags]&loadedHigh == 0 {
		return nil, fmt.Errorf("kernel does not load high: %w", ErrNotBzImage)
	}
	if binary.LittleEndian.Uint16(b[hdrXLoadFlags:])&xlfKernel64 == 0 {
		return nil, fmt.Errorf("kernel has no 64-bit entry point: %w", ErrNotBzImage)
	}
	sects := int(b[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	setupLen := (sects + 1) * 512
	if setupLen >= len(b) {
		return nil, fmt.Errorf("setup of %d bytes in a %d-byte file: %w", setupLen, len(b), ErrNotBzImage)
	}
	k.setup, k.protected = b[:setupLen], b[setupLen:]
	k.LoadAddr = binary.LittleEndian.Uint64(b[hdrPrefAddress:])
	if k.LoadAddr == 0 || b[hdrRelocatable] != 0 && k.LoadAddr < KernelAddr {
		k.LoadAddr = KernelAddr
	}
	k.InitSize = uint64(binary.LittleEndian.Uint32(b[hdrInitSize:]))
	k.initrdMax = uint64(binary.LittleEndian.Uint32(b[hdrInitrdMax:]))
	return k, nil
}

// Boot is where to enter a loaded kernel.
type Boot struct {
	Entry    uint64 // RIP: the 64-bit entry, LoadAddr + 0x200
	ZeroPage uint64 // RSI
}

// Load places the kernel, its zero page, the command line and initrd (may
// be nil) in mem, which is guest RAM from physical address 0, and returns the
// entry. The e820 map marks the first 640 KiB and everything from 1 MiB up
// as RAM.
func (k *Kernel) Load(mem []byte, cmdline string, initrd []byte) (Boot, error) {
	size := uint64(len(mem))
	need := k.LoadAddr + max(k.InitSize, uint64(len(k.protected)))
	if need > size {
		return Boot{}, fmt.Errorf("kernel needs memory up to %#x, guest has %#x", need, size)
	}
	if len(cmdline)+1 > maxCmdline {
		return Boot{}, fmt.Errorf("command line of %d bytes is too long", len(cmdline))
	}
	copy(mem[k.LoadAddr:], k.protected)
	clear(mem[CmdlineAddr : CmdlineAddr+maxCmdline])
	copy(mem[CmdlineAddr:], cmdline)

	zp := mem[ZeroPage : ZeroPage+4096]
	clear(zp)
	// The setup header goes into the zero page as it is in the image.
	hdrLen := min(int(0x202+uint16(k.setup[0x201]))-hdrSetupSects, len(k.setup)-hdrSetupSects)
	copy(zp[hdrSetupSects:], k.setup[hdrSetupSects:hdrSetupSects+hdrLen])
	le := binary.LittleEndian
	zp[hdrTypeOfLoader] = typeOfLoaderUndef
	zp[hdrLoadFlags] |= canUseHeap
	le.PutUint32(zp[hdrCmdLinePtr:], CmdlineAddr)
	if len(initrd) > 0 {
		// As high as the kernel allows, page-aligned, below the top.
		top := min(size, k.initrdMax+1)
		if k.initrdMax == 0 {
			top = size
		}
		addr := (top - uint64(len(initrd))) &^ 0xfff
		if addr <= need {
			return Boot{}, fmt.Errorf("initrd of %d bytes does not fit above the kernel", len(initrd))
		}
		copy(mem[addr:], initrd)
		le.PutUint32(zp[hdrRamdiskImage:], uint32(addr))
		le.PutUint32(zp[hdrRamdiskSize:], uint32(len(initrd)))
	}
	entries := []struct {
		addr, size uint64
		typ        uint32
	}{
		{0, 0x9fc00, e820RAM},
		{0x9fc00, 0x100000 - 0x9fc00, e820Reserved},
		{0x100000, size - 0x100000, e820RAM},
	}
	for i, e := range entries {
		off := zpE820Table + i*20
		le.PutUint64(zp[off:], e.addr)
		le.PutUint64(zp[off+8:], e.size)
		le.PutUint32(zp[off+16:], e.typ)
	}
	zp[zpE820Entries] = byte(len(entries))
	return Boot{Entry: k.LoadAddr + 0x200, ZeroPage: ZeroPage}, nil
}
