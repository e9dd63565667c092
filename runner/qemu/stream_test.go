package qemu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestStripRAMRejectsOtherStreams(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"not QEVM", []byte("GARBAGE!")},
		{"truncated header", []byte{0x51, 0x45, 0x56, 0x4d, 0, 0}},
		{"unknown section", []byte{0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x42}},
		{"live section other than RAM", append([]byte{0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, vmSectionStart, 0, 0, 0, 1, 5}, "block"...)},
	} {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			if _, err := stripRAM(bytes.NewReader(c.in), &out); !errors.Is(err, errStream) {
				t.Fatalf("stripRAM = %v, want errStream", err)
			}
		})
	}
}

// liveStream builds the stream of a live copy (live: saved without
// x-ignore-shared, the guest RAM block "mem" of 4 pages among the pages) or
// what splitRAM makes of it (the configuration says x-ignore-shared, the
// block list has addresses, and no record of "mem" is left).
func liveStream(live bool) []byte {
	var b streamBuilder
	page := func(fill byte) { b.Write(bytes.Repeat([]byte{fill}, migrationPage)) }
	b.be32(vmFileMagic)
	b.be32(vmFileVersion)
	b.u8(vmConfiguration)
	b.be32(13)
	b.WriteString("pc-i440fx-7.2")
	if !live {
		b.u8(vmSubsection)
		b.str("configuration/capabilities")
		b.be32(1)
		b.be32(1)
		b.str("x-ignore-shared")
	}
	b.u8(vmSectionStart)
	b.be32(testRAMID)
	b.str("ram")
	b.be32(0)
	b.be32(4)
	b.be64((4*migrationPage + 2*migrationPage) | ramFlagMemSize)
	b.str("mem")
	b.be64(4 * migrationPage)
	if !live {
		b.be64(0)
	}
	b.str("pc.rom")
	b.be64(2 * migrationPage)
	if !live {
		b.be64(0)
	}
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	// A pass: pages 0, 1 (zeros) and 3 of "mem", the ROM's first between.
	b.u8(vmSectionPart)
	b.be32(testRAMID)
	if live {
		b.be64(0 | ramFlagPage)
		b.str("mem")
		page(0x11)
		b.be64(migrationPage | ramFlagZero | ramFlagContinue)
		b.u8(0)
	}
	b.be64(0 | ramFlagPage)
	b.str("pc.rom")
	page(0xab)
	if live {
		b.be64(3*migrationPage | ramFlagPage)
		b.str("mem")
		page(0x33)
	}
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	// The last pass, the guest stopped: page 0 is zeros again.
	b.u8(vmSectionEnd)
	b.be32(testRAMID)
	if live {
		b.be64(0 | ramFlagZero)
		b.str("mem")
		b.u8(0)
	}
	b.be64(migrationPage | ramFlagZero)
	b.str("pc.rom")
	b.u8(0)
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	b.u8(vmSectionFull)
	b.be32(3)
	b.str("timer")
	b.be32(0)
	b.be32(2)
	b.Write([]byte{0, 0, 0, 0, 0, 0, 0, 7})
	b.u8(vmSectionFooter)
	b.be32(3)
	b.u8(vmEOF)
	return b.Bytes()
}

// TestSplitRAM splits a live copy's stream: the guest RAM's records go to
// the page writer, in order, and the rest comes out as a snapshot saved with
// x-ignore-shared would have it, which planPostcopy (a lazy restore) reads.
func TestSplitRAM(t *testing.T) {
	type rec struct {
		off  int64
		zero bool
	}
	var got []rec
	var out bytes.Buffer
	err := splitRAM(bytes.NewReader(liveStream(true)), &out, func(off int64, zero bool) ([]byte, error) {
		got = append(got, rec{off, zero})
		return make([]byte, migrationPage), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []rec{{0, false}, {migrationPage, true}, {3 * migrationPage, false}, {0, true}}
	if !slices.Equal(got, want) {
		t.Errorf("pages %v, want %v", got, want)
	}
	if !bytes.Equal(out.Bytes(), liveStream(false)) {
		t.Fatalf("device state:\n%x\nwant\n%x", out.Bytes(), liveStream(false))
	}
	if _, err := planPostcopy(out.Bytes()); err != nil {
		t.Fatalf("planPostcopy of the device state: %v", err)
	}
	// A stream saved with x-ignore-shared is not a live copy's.
	if err := splitRAM(bytes.NewReader(liveStream(false)), io.Discard, func(int64, bool) ([]byte, error) {
		return make([]byte, migrationPage), nil
	}); !errors.Is(err, errStream) {
		t.Fatalf("splitRAM of a stream with x-ignore-shared = %v, want errStream", err)
	}
}

// TestSplitRAMRejects: a page outside the guest RAM block, a zero page
// filled with something else, and the page writer's error end the split.
func TestSplitRAMRejects(t *testing.T) {
	put := func(int64, bool) ([]byte, error) { return make([]byte, migrationPage), nil }
	stream := liveStream(true)
	outside := bytes.Replace(stream, binary.BigEndian.AppendUint64(nil, 3*migrationPage|ramFlagPage), binary.BigEndian.AppendUint64(nil, 4*migrationPage|ramFlagPage), 1)
	filled := bytes.Replace(stream, append(binary.BigEndian.AppendUint64(nil, migrationPage|ramFlagZero|ramFlagContinue), 0), append(binary.BigEndian.AppendUint64(nil, migrationPage|ramFlagZero|ramFlagContinue), 7), 1)
	for _, c := range []struct {
		name   string
		stream []byte
		put    func(int64, bool) ([]byte, error)
		want   error
	}{
		{"page outside", outside, put, errStream},
		{"zero page filled", filled, put, errStream},
		{"cut short", stream[:len(stream)/2], put, errStream},
		{"writer fails", stream, func(int64, bool) ([]byte, error) { return nil, errTestWriter }, errTestWriter},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := splitRAM(bytes.NewReader(c.stream), io.Discard, c.put); !errors.Is(err, c.want) {
				t.Fatalf("splitRAM = %v, want %v", err, c.want)
			}
		})
	}
}

var errTestWriter = errors.New("test writer")

func FuzzSplitRAM(f *testing.F) {
	f.Add(liveStream(true))
	f.Add(liveStream(false))
	f.Fuzz(func(t *testing.T, stream []byte) {
		var out bytes.Buffer
		err := splitRAM(bytes.NewReader(stream), &out, func(off int64, zero bool) ([]byte, error) {
			if off < 0 || off%migrationPage != 0 {
				t.Fatalf("page at %d", off)
			}
			return make([]byte, migrationPage), nil
		})
		if err != nil && !errors.Is(err, errStream) {
			t.Fatalf("error not errStream: %v", err)
		}
	})
}

// TestPageWriter writes pages into a file of holes as a live copy does: a
// page of zeros never written stays a hole, one written before is zeroed,
// and punch gives back the holes whose last record was zeros.
func TestPageWriter(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mem")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const pages = 8
	if err := f.Truncate(pages * migrationPage); err != nil {
		t.Fatal(err)
	}
	w := &pageWriter{f: f, size: pages * migrationPage}
	put := func(p int64, fill byte, zero bool) {
		t.Helper()
		dst, err := w.put(p*migrationPage, zero)
		if err != nil {
			t.Fatal(err)
		}
		if zero {
			return
		}
		for i := range dst {
			dst[i] = fill
		}
	}
	put(0, 0x10, false)
	put(1, 0x11, false)
	put(2, 0, true) // a hole still
	put(3, 0x13, false)
	put(5, 0x15, false)
	put(1, 0, true) // written before: zeros now
	put(5, 0x25, false)
	if _, err := w.put(pages*migrationPage, false); err == nil {
		t.Fatal("put of a page past the file's end succeeded")
	}
	if err := w.flush(); err != nil {
		t.Fatal(err)
	}
	if w.pages != 6 {
		t.Errorf("%d pages written, want 6", w.pages)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range []byte{0x10, 0, 0, 0x13, 0, 0x25, 0, 0} {
		if got := b[p*migrationPage : (p+1)*migrationPage]; !bytes.Equal(got, bytes.Repeat([]byte{want}, migrationPage)) {
			t.Errorf("page %d holds %#x..., want %#x", p, got[0], want)
		}
	}
	gaps, err := holes(f, pages*migrationPage)
	if err != nil {
		t.Fatal(err)
	}
	if want := [][2]int64{{2, 3}, {4, 5}, {6, 8}}; !slices.Equal(gaps, want) {
		t.Errorf("holes %v, want %v", gaps, want)
	}
	// As if pages 0 to 5 had been holes: those whose last record was zeros
	// (1 and 2; 4 had none) go back to holes, those with data stay.
	if err := w.punch(f, [][2]int64{{0, 6}}); err != nil {
		t.Fatal(err)
	}
	gaps, err = holes(f, pages*migrationPage)
	if err != nil {
		t.Fatal(err)
	}
	if want := [][2]int64{{1, 3}, {4, 5}, {6, 8}}; !slices.Equal(gaps, want) {
		t.Errorf("holes after punch %v, want %v", gaps, want)
	}
}
