package guest

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// writeObject writes a minimal ELF64 object file whose only section besides
// the names is .modinfo with the given NUL-separated entries: enough for a
// fake kernel module, or (with no entries) a fake static executable.
func writeObject(t *testing.T, path string, modinfo ...string) {
	t.Helper()
	info := []byte(strings.Join(modinfo, "\x00") + "\x00")
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
	must(t, binary.Write(&b, binary.LittleEndian, hdr))
	b.Write(info)
	b.Write(names)
	b.Write(make([]byte, shOff-uint64(b.Len())))
	sections := []elf.Section64{
		{},
		{Name: 1, Type: uint32(elf.SHT_PROGBITS), Flags: uint64(elf.SHF_ALLOC), Off: infoOff, Size: uint64(len(info)), Addralign: 1},
		{Name: 10, Type: uint32(elf.SHT_STRTAB), Off: namesOff, Size: uint64(len(names)), Addralign: 1},
	}
	for _, s := range sections {
		must(t, binary.Write(&b, binary.LittleEndian, s))
	}
	must(t, os.MkdirAll(filepath.Dir(path), 0o755))
	must(t, os.WriteFile(path, b.Bytes(), 0o644))
}

// fakeModules writes a module tree under dir: one NAME.ko per entry of
// deps, NAME → its comma-separated depends=.
func fakeModules(t *testing.T, dir string, deps map[string]string) {
	t.Helper()
	for name, dep := range deps {
		writeObject(t, filepath.Join(dir, "kernel", strings.ReplaceAll(name, "_", "-")+".ko"), "license=GPL", "depends="+dep, "name="+name)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// cpioEntry is one record of a newc archive.
type cpioEntry struct {
	name         string
	mode         uint32
	rmajor       uint32
	rminor       uint32
	data         []byte
	uid, gid     uint32
	nlink, mtime uint32
}

// readInitramfs reads back a gzip newc archive, in order, without its
// trailer.
func readInitramfs(t *testing.T, path string) []cpioEntry {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	must(t, err)
	raw, err := io.ReadAll(zr)
	must(t, err)
	var out []cpioEntry
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(raw) || string(raw[off:off+6]) != "070701" {
			t.Fatalf("bad newc header at %d", off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(raw[off+6+8*i:off+14+8*i]), 16, 32)
			must(t, err)
			return uint32(v)
		}
		e := cpioEntry{mode: field(1), uid: field(2), gid: field(3), nlink: field(4), mtime: field(5), rmajor: field(9), rminor: field(10)}
		size, namesize := int(field(6)), int(field(11))
		e.name = string(raw[off+110 : off+110+namesize-1])
		data := align(off + 110 + namesize)
		e.data = raw[data : data+size]
		off = align(data + size)
		if e.name == "TRAILER!!!" {
			return out
		}
		out = append(out, e)
	}
}
