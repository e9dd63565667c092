package testutil

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

// WriteELF writes a minimal relocatable ELF64 file at path whose only
// section besides the section names is .modinfo, holding the entries given
// (each NUL-terminated, as modpost lays them out): enough for a fake kernel
// module, or, with no entries, a fake static executable.
func WriteELF(t testing.TB, path string, modinfo ...string) {
	t.Helper()
	var info []byte
	for _, s := range modinfo {
		info = append(append(info, s...), 0)
	}
	names := []byte("\x00.modinfo\x00.shstrtab\x00")
	const hdrLen, shLen = 64, 64
	infoOff := uint64(hdrLen)
	namesOff := infoOff + uint64(len(info))
	shOff := (namesOff + uint64(len(names)) + 7) &^ 7

	var b bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(elf.ET_REL), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Shoff: shOff, Ehsize: hdrLen, Shentsize: shLen, Shnum: 3, Shstrndx: 2,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	sections := []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Flags: uint64(elf.SHF_ALLOC), Off: infoOff, Size: uint64(len(info)), Addralign: 1},
		{Name: 10, Type: uint32(elf.SHT_STRTAB), Off: namesOff, Size: uint64(len(names)), Addralign: 1},
	}
	if err := binary.Write(&b, binary.LittleEndian, hdr); err != nil {
		t.Fatal(err)
	}
	b.Write(info)
	b.Write(names)
	b.Write(make([]byte, shOff-uint64(b.Len())))
	if err := binary.Write(&b, binary.LittleEndian, sections); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}
