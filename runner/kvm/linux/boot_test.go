package linux

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"
)

// image builds a minimal bzImage: one setup sector after the boot sector,
// and a protected-mode part of protLen bytes.
func image(version uint16, xload uint16, protLen int) []byte {
	b := make([]byte, 1024+protLen)
	le := binary.LittleEndian
	b[hdrSetupSects] = 1
	le.PutUint16(b[hdrBootFlag:], 0xaa55)
	b[0x201] = byte(hdrEnd - 0x202) // the jump over the header
	copy(b[hdrMagic:], "HdrS")
	le.PutUint16(b[hdrVersion:], version)
	b[hdrLoadFlags] = loadedHigh
	le.PutUint32(b[hdrInitrdMax:], 0x7fffffff)
	le.PutUint32(b[hdrAlignment:], 0x200000)
	b[hdrRelocatable] = 1
	le.PutUint16(b[hdrXLoadFlags:], xload)
	le.PutUint32(b[hdrCmdlineSize:], 2047)
	le.PutUint64(b[hdrPrefAddress:], 0x1000000)
	le.PutUint32(b[hdrInitSize:], 0x400000)
	for i := 1024; i < len(b); i++ {
		b[i] = byte(i * 7)
	}
	return b
}

func TestLoad(t *testing.T) {
	img := image(0x20f, xlfKernel64, 8192)
	k, err := Parse(img)
	if err != nil {
		t.Fatal(err)
	}
	mem := make([]byte, 64<<20)
	initrd := bytes.Repeat([]byte("initrd"), 1000)
	boot, err := k.Load(mem, "console=ttyS0 root=/dev/vda", initrd)
	if err != nil {
		t.Fatal(err)
	}
	if boot.Entry != 0x1000200 || boot.ZeroPage != ZeroPage {
		t.Errorf("entry %#x, zero page %#x", boot.Entry, boot.ZeroPage)
	}
	if !bytes.Equal(mem[0x1000000:0x1000000+8192], img[1024:]) {
		t.Error("protected-mode part not at the preferred address")
	}
	zp := mem[ZeroPage:]
	le := binary.LittleEndian
	if string(zp[hdrMagic:hdrMagic+4]) != "HdrS" || zp[hdrTypeOfLoader] != 0xff || zp[hdrLoadFlags]&canUseHeap == 0 {
		t.Error("setup header not copied into the zero page with the loader's fields")
	}
	if ptr := le.Uint32(zp[hdrCmdLinePtr:]); ptr != CmdlineAddr || !strings.HasPrefix(string(mem[ptr:]), "console=ttyS0 root=/dev/vda\x00") {
		t.Errorf("command line at %#x: %q", ptr, mem[ptr:ptr+32])
	}
	addr, size := le.Uint32(zp[hdrRamdiskImage:]), le.Uint32(zp[hdrRamdiskSize:])
	if size != uint32(len(initrd)) || addr%4096 != 0 || !bytes.Equal(mem[addr:addr+size], initrd) || uint64(addr) < 0x1400000 {
		t.Errorf("initrd at %#x+%d", addr, size)
	}
	if n := zp[zpE820Entries]; n != 3 {
		t.Fatalf("%d e820 entries", n)
	}
	last := zpE820Table + 2*20
	if le.Uint64(zp[last:]) != 0x100000 || le.Uint64(zp[last+8:]) != uint64(len(mem))-0x100000 || le.Uint32(zp[last+16:]) != e820RAM {
		t.Error("e820 does not cover RAM above 1 MiB")
	}
}

func TestParseRejects(t *testing.T) {
	tests := []struct {
		name string
		img  []byte
	}{
		{"too short", make([]byte, 100)},
		{"no magic", make([]byte, 4096)},
		{"protocol 2.10", image(0x20a, xlfKernel64, 4096)},
		{"no 64-bit entry", image(0x20f, 0, 4096)},
		{"nothing after setup", image(0x20f, xlfKernel64, 0)},
	}
	for _, tc := range tests {
		if _, err := Parse(tc.img); !errors.Is(err, ErrNotBzImage) {
			t.Errorf("%s: %v, want ErrNotBzImage", tc.name, err)
		}
	}
	k, err := Parse(image(0x20f, xlfKernel64, 4096))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.Load(make([]byte, 8<<20), "", nil); err == nil {
		t.Error("a kernel that needs 20 MiB loaded into 8 MiB")
	}
}

// TestBootLinux is where a Linux guest boots on boxd's own VMM; it needs a
// CPU with hardware virtualisation.
func TestBootLinux(t *testing.T) {
	cpuinfo, _ := os.ReadFile("/proc/cpuinfo")
	if !bytes.Contains(cpuinfo, []byte(" vmx")) && !bytes.Contains(cpuinfo, []byte(" svm")) {
		t.Skip("needs hardware virtualisation (vmx/svm)")
	}
	t.Skip("the Linux device model (irqchip, legacy ports, virtio-mmio) is not built yet; see the package doc")
}
