// Package guest builds boxd's conformance guest: a long-mode program of the
// project's own (guest.S), compiled with gcc at build or test time, whose
// state a test can observe through port I/O.
//
// Memory layout (guest physical = host offset in guest RAM):
//
//	0x0500   GDT (written by the VMM)
//	0x1000   page tables: PML4, PDPT, PD with 2 MiB pages (by the VMM)
//	0x8000   the page CmdFill copies into the pages it fills
//	0x9000   parameters, u64 each: memory size, data start, pages dirtied
//	         per tick, seed, ticks between console lines (0: none)
//	0x9100   the guest's state: tick counter, random-number state
//	0x10000  code (Load), entered at its first byte
//	0x80000  top of the stack
//	DataStart .. memory size: the pages the writer dirties (their first
//	         word) and the checksum covers (the first word of each page: on
//	         hosts without hardware virtualisation KVM runs this guest a
//	         thousand times slower than native, so it reads little)
//
// Ports: 0x3f8 serial (console bytes out); 0x510 control (the guest reads a
// command each tick: CmdRun, CmdReport, CmdHalt, CmdReseed, CmdFill); 0x511
// report (four 32-bit writes: checksum low, high, tick low, high); 0x512
// halting; 0x513 arguments, two 32-bit reads after the commands that take
// them: after CmdReseed the seed (low, high, mixed into the writer's random
// state), after CmdFill the first data page and the number of pages.
package guest

import (
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

//go:embed guest.S
var source []byte

// Layout and ports, as guest.S uses them.
const (
	GDTAddr    = 0x500
	PML4Addr   = 0x1000
	PoolAddr   = 0x8000
	ParamsAddr = 0x9000
	StateAddr  = 0x9100
	Load       = 0x10000
	StackTop   = 0x80000
	DataStart  = 0x100000

	PortSerial = 0x3f8
	PortCtrl   = 0x510
	PortReport = 0x511
	PortDone   = 0x512
	PortSeed   = 0x513 // arguments of CmdReseed and CmdFill
)

// Commands the VMM answers on PortCtrl.
const (
	CmdRun    = 0
	CmdReport = 1
	CmdHalt   = 2
	CmdReseed = 3
	// CmdFill fills whole data pages with fresh pseudo-random words (a
	// stream of their own: the writer's is left alone), so that an exact
	// amount of memory is dirty and stores as new, incompressible data.
	// Pages past the end of memory are skipped.
	CmdFill = 4
)

// Build compiles the guest with gcc, as and ld into dir and returns the flat
// binary's path.
func Build(dir string) (string, error) {
	src := filepath.Join(dir, "guest.S")
	obj := filepath.Join(dir, "guest.o")
	elf := filepath.Join(dir, "guest.elf")
	bin := filepath.Join(dir, "guest.bin")
	if err := os.WriteFile(src, source, 0o644); err != nil {
		return "", err
	}
	steps := [][]string{
		{"gcc", "-c", "-o", obj, src},
		{"ld", "-static", "--build-id=none", "-Ttext", fmt.Sprintf("%#x", Load), "-e", "_start", "-o", elf, obj},
		{"objcopy", "-O", "binary", "-j", ".text", elf, bin},
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return "", fmt.Errorf("building the guest: %s: %w: %s", s[0], err, out)
		}
	}
	return bin, nil
}
