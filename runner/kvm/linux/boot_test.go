package linux

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/guestkernel"
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

// cloudKernel fetches Debian's cloud kernel, the one boxd boots its guests
// with, and returns its release and bzImage.
func cloudKernel(t *testing.T) (release string, img []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cache, err := guestkernel.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	k, err := guestkernel.Fetch(ctx, cache)
	if err != nil {
		t.Fatalf("cannot fetch the guest kernel: %v", err)
	}
	if img, err = os.ReadFile(k.Vmlinuz); err != nil {
		t.Fatal(err)
	}
	return k.Release, img
}

// TestLoadCloudKernel parses and loads a real bzImage, and checks what the
// loader read and wrote against the image's own setup header, as the
// kernel's boot code will read it from the zero page.
func TestLoadCloudKernel(t *testing.T) {
	release, img := cloudKernel(t)
	le := binary.LittleEndian
	// The kernel_version field points at a string in the setup code, 0x200
	// before its offset in the file: this is the kernel fetched.
	if at := int(le.Uint16(img[0x20e:])) + 0x200; at >= len(img) || !bytes.HasPrefix(img[at:], []byte(release+" ")) {
		t.Fatalf("the image does not name release %s", release)
	}
	k, err := Parse(img)
	if err != nil {
		t.Fatal(err)
	}
	setupLen := (int(img[hdrSetupSects]) + 1) * 512
	if k.Version != le.Uint16(img[hdrVersion:]) || k.Version < minProtocol {
		t.Errorf("protocol %#x", k.Version)
	}
	if len(k.setup) != setupLen || !bytes.Equal(k.protected, img[setupLen:]) {
		t.Errorf("setup of %d bytes, want %d (%d setup sectors)", len(k.setup), setupLen, img[hdrSetupSects])
	}
	// syssize counts the protected-mode code in 16-byte units; a signed
	// image has its signature after it.
	if sys := 16 * int(le.Uint32(img[0x1f4:])); sys == 0 || len(k.protected) < sys || len(k.protected)-sys >= 64<<10 {
		t.Errorf("protected-mode part of %d bytes, the header says %d", len(k.protected), sys)
	}
	align := uint64(le.Uint32(img[hdrAlignment:]))
	if want := le.Uint64(img[hdrPrefAddress:]); k.LoadAddr != want || want < KernelAddr || align == 0 || k.LoadAddr%align != 0 {
		t.Errorf("load address %#x, want the preferred %#x aligned to %#x", k.LoadAddr, want, align)
	}
	if want := uint64(le.Uint32(img[hdrInitSize:])); k.InitSize != want || k.InitSize <= uint64(len(k.protected)) {
		t.Errorf("init size %#x, want %#x, above the %#x bytes loaded", k.InitSize, want, len(k.protected))
	}

	// Too little memory for the kernel to decompress in: refused.
	if _, err := k.Load(make([]byte, k.LoadAddr+k.InitSize-4096), "", nil); err == nil {
		t.Error("a kernel loaded into less memory than its init size needs")
	}

	mem := make([]byte, 256<<20)
	cmdline := "console=ttyS0 panic=-1 quiet"
	initrd := bytes.Repeat([]byte("070701"), 100_000)
	boot, err := k.Load(mem, cmdline, initrd)
	if err != nil {
		t.Fatal(err)
	}
	if boot.Entry != k.LoadAddr+0x200 || boot.ZeroPage != ZeroPage {
		t.Errorf("entry %#x, zero page %#x; want startup_64 at %#x", boot.Entry, boot.ZeroPage, k.LoadAddr+0x200)
	}
	if !bytes.Equal(mem[k.LoadAddr:k.LoadAddr+uint64(len(k.protected))], k.protected) {
		t.Error("the protected-mode part is not at the load address")
	}

	// The zero page holds the image's setup header, from setup_sects to
	// the end the jump at 0x200 gives, with the loader's fields set, and
	// nothing else but the e820 map.
	zp := mem[ZeroPage : ZeroPage+4096]
	if img[0x200] != 0xeb {
		t.Fatalf("no short jump over the setup header at 0x200: %#x", img[0x200])
	}
	end := 0x202 + int(img[0x201])
	if end < hdrEnd {
		t.Fatalf("the header ends at %#x, before init_size", end)
	}
	written := map[int]bool{hdrTypeOfLoader: true, hdrLoadFlags: true}
	for _, f := range []int{hdrRamdiskImage, hdrRamdiskSize, hdrCmdLinePtr} {
		for i := range 4 {
			written[f+i] = true
		}
	}
	for i := hdrSetupSects; i < end; i++ {
		if !written[i] && zp[i] != img[i] {
			t.Errorf("zero page byte %#x is %#x, the image's is %#x", i, zp[i], img[i])
		}
	}
	if zp[hdrTypeOfLoader] != typeOfLoaderUndef || zp[hdrLoadFlags] != img[hdrLoadFlags]|canUseHeap {
		t.Errorf("type_of_loader %#x, loadflags %#x", zp[hdrTypeOfLoader], zp[hdrLoadFlags])
	}
	e820End := zpE820Table + int(zp[zpE820Entries])*20
	for i, b := range zp {
		inHeader := i >= hdrSetupSects && i < end
		if b != 0 && !inHeader && i != zpE820Entries && (i < zpE820Table || i >= e820End) {
			t.Errorf("zero page byte %#x is %#x, outside the header and the e820 map", i, b)
			break
		}
	}

	ptr := le.Uint32(zp[hdrCmdLinePtr:])
	if got, _, _ := strings.Cut(string(mem[ptr:ptr+maxCmdline]), "\x00"); got != cmdline || len(cmdline) > int(le.Uint32(img[hdrCmdlineSize:])) {
		t.Errorf("command line at %#x: %q", ptr, got)
	}
	addr, size := uint64(le.Uint32(zp[hdrRamdiskImage:])), uint64(le.Uint32(zp[hdrRamdiskSize:]))
	if size != uint64(len(initrd)) || addr%4096 != 0 || addr < k.LoadAddr+k.InitSize ||
		addr+size > uint64(len(mem)) || addr+size-1 > uint64(le.Uint32(img[hdrInitrdMax:])) || !bytes.Equal(mem[addr:addr+size], initrd) {
		t.Errorf("initrd at %#x+%#x, kernel up to %#x, memory %#x", addr, size, k.LoadAddr+k.InitSize, len(mem))
	}
	// The e820 map: low memory, the legacy hole, and RAM from 1 MiB to the
	// end, which covers the kernel and the initrd.
	want := [][3]uint64{{0, 0x9fc00, e820RAM}, {0x9fc00, 0x100000 - 0x9fc00, e820Reserved}, {0x100000, uint64(len(mem)) - 0x100000, e820RAM}}
	if n := int(zp[zpE820Entries]); n != len(want) {
		t.Fatalf("%d e820 entries, want %d", n, len(want))
	}
	for i, w := range want {
		e := zp[zpE820Table+i*20:]
		if got := [3]uint64{le.Uint64(e), le.Uint64(e[8:]), uint64(le.Uint32(e[16:]))}; got != w {
			t.Errorf("e820 entry %d: %#x, want %#x", i, got, w)
		}
	}
}
