package qemu

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

// savedStream builds device state as stripRAM leaves it: the header, a
// configuration with x-ignore-shared among its capabilities, the RAM
// section (guest RAM "mem" and a small block "pc.rom", with addresses),
// a part with the small block's pages, the end, one device and the end of
// file, then QEMU's JSON description.
type streamBuilder struct{ bytes.Buffer }

func (b *streamBuilder) u8(v byte)     { b.WriteByte(v) }
func (b *streamBuilder) be32(v uint32) { b.Write(binary.BigEndian.AppendUint32(nil, v)) }
func (b *streamBuilder) be64(v uint64) { b.Write(binary.BigEndian.AppendUint64(nil, v)) }
func (b *streamBuilder) str(s string)  { b.u8(byte(len(s))); b.WriteString(s) }

const testRAMID = 2

func savedStream(t testing.TB, mutate func(part string, b *streamBuilder) bool) []byte {
	t.Helper()
	var b streamBuilder
	step := func(part string) bool { return mutate == nil || mutate(part, &b) }
	b.be32(vmFileMagic)
	b.be32(vmFileVersion)
	b.u8(vmConfiguration)
	b.be32(13)
	b.WriteString("pc-i440fx-7.2")
	if step("capabilities") {
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
	b.be64((16*migrationPage + 2*migrationPage) | ramFlagMemSize)
	b.str("mem")
	b.be64(16 * migrationPage)
	b.be64(0) // address
	b.str("pc.rom")
	b.be64(2 * migrationPage)
	b.be64(0xfffc0000)
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	b.u8(vmSectionPart)
	b.be32(testRAMID)
	if step("rom pages") {
		b.be64(0 | ramFlagPage)
		b.str("pc.rom")
		b.Write(bytes.Repeat([]byte{0xab}, migrationPage))
		b.be64(migrationPage | ramFlagZero | ramFlagContinue)
		b.u8(0)
	}
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	b.u8(vmSectionEnd)
	b.be32(testRAMID)
	b.be64(ramFlagEOS)
	b.u8(vmSectionFooter)
	b.be32(testRAMID)
	if step("device") {
		b.u8(vmSectionFull)
		b.be32(3)
		b.str("timer")
		b.be32(0)
		b.be32(2)
		b.Write([]byte{0, 0, 0, 0, 0, 0, 0, 7, vmSectionFooter, 0}) // a body that looks like a footer part-way
		b.u8(vmSectionFooter)
		b.be32(3)
	}
	if step("eof") {
		b.u8(vmEOF)
	}
	if step("description") {
		desc := `{"page_size":4096,"devices":[]}`
		b.u8(vmVMDescription)
		b.be32(uint32(len(desc)))
		b.WriteString(desc)
	}
	return b.Bytes()
}

func TestPlanPostcopy(t *testing.T) {
	for _, c := range []struct {
		name   string
		mutate func(string, *streamBuilder) bool
	}{
		{"with a description", nil},
		{"without a description", func(part string, _ *streamBuilder) bool { return part != "description" }},
	} {
		t.Run(c.name, func(t *testing.T) {
			state := savedStream(t, c.mutate)
			p, err := planPostcopy(state)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(p.header, []byte("x-ignore-shared")) {
				t.Error("the header keeps the saving QEMU's capabilities")
			}
			if !bytes.HasSuffix(p.header, []byte("pc-i440fx-7.2")) {
				t.Errorf("header %q does not end with the machine type", p.header)
			}
			if p.ramID != testRAMID || p.ramVersion != 4 || len(p.blocks) != 2 || p.blocks[0] != (ramBlock{"mem", 16 * migrationPage}) {
				t.Errorf("RAM section %d v%d blocks %v", p.ramID, p.ramVersion, p.blocks)
			}
			if p.ramParts[0] != vmSectionPart || bytes.Count(p.ramParts, []byte{vmSectionPart, 0, 0, 0, testRAMID}) != 2 {
				t.Errorf("the RAM parts are not two parts: % x", p.ramParts[:8])
			}
			if p.devices[0] != vmSectionFull || !bytes.HasSuffix(p.devices, []byte{vmSectionFooter, 0, 0, 0, 3}) {
				t.Errorf("devices % x", p.devices)
			}
		})
	}
}

func TestPlanPostcopyRejects(t *testing.T) {
	for _, c := range []struct {
		name   string
		mutate func(string, *streamBuilder) bool
	}{
		{"no end of file", func(part string, _ *streamBuilder) bool { return part != "eof" && part != "description" }},
		{"a page of guest RAM", func(part string, b *streamBuilder) bool {
			if part == "rom pages" {
				b.be64(0 | ramFlagPage)
				b.str("mem")
				b.Write(make([]byte, migrationPage))
				return false
			}
			return true
		}},
		{"an unknown configuration subsection", func(part string, b *streamBuilder) bool {
			if part == "capabilities" {
				b.u8(vmSubsection)
				b.str("configuration/other")
				b.be32(1)
				return false
			}
			return true
		}},
		{"a page with unknown flags", func(part string, b *streamBuilder) bool {
			if part == "rom pages" {
				b.be64(0 | 0x100)
				return false
			}
			return true
		}},
		{"a record that continues nothing", func(part string, b *streamBuilder) bool {
			if part == "rom pages" {
				b.be64(0 | ramFlagPage | ramFlagContinue)
				b.Write(make([]byte, migrationPage))
				return false
			}
			return true
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := planPostcopy(savedStream(t, c.mutate)); !errors.Is(err, errStream) {
				t.Fatalf("planPostcopy = %v, want errStream", err)
			}
		})
	}
	state := savedStream(t, nil)
	withoutDesc := len(savedStream(t, func(part string, _ *streamBuilder) bool { return part != "description" }))
	for n := range len(state) - 1 {
		if n == withoutDesc {
			continue // a stream without its description is whole
		}
		if _, err := planPostcopy(state[:n]); err == nil {
			t.Fatalf("planPostcopy of the first %d of %d bytes succeeded", n, len(state))
		}
	}
	if _, err := planPostcopy([]byte("QEVM")); !errors.Is(err, errStream) {
		t.Fatalf("planPostcopy of a short header = %v", err)
	}
}

// TestPostcopyStream checks what boxd sends as a postcopy source: the
// header without capabilities, the return path's opening, the advice, the
// block list without addresses, the small blocks' pages, the discard, the
// package (listen, devices, run) of the length it says, pages and the end.
func TestPostcopyStream(t *testing.T) {
	p, err := planPostcopy(savedStream(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	pw := &postcopyWriter{w: bufio.NewWriter(&out)}
	if err := pw.prelude(p); err != nil {
		t.Fatal(err)
	}
	if err := pw.pack(p, 5*migrationPage); err != nil {
		t.Fatal(err)
	}
	page := bytes.Repeat([]byte{7}, migrationPage)
	if err := pw.pages(p.ramID, "mem", []uint64{3 * migrationPage, 4 * migrationPage}, append(page, make([]byte, migrationPage)...), []bool{false, true}); err != nil {
		t.Fatal(err)
	}
	if err := pw.end(p.ramID); err != nil {
		t.Fatal(err)
	}
	c := &streamCursor{b: out.Bytes()}
	expect := func(what string, got, want uint64) {
		t.Helper()
		if c.err != nil {
			t.Fatalf("%s: %v", what, c.err)
		}
		if got != want {
			t.Fatalf("%s: %#x, want %#x", what, got, want)
		}
	}
	c.take(len(p.header))
	command := func(cmd uint16, length int) []byte {
		t.Helper()
		expect("command", uint64(c.u8()), vmCommand)
		expect("command number", uint64(binary.BigEndian.Uint16(c.take(2))), uint64(cmd))
		expect("command length", uint64(binary.BigEndian.Uint16(c.take(2))), uint64(length))
		return c.take(length)
	}
	command(cmdOpenReturnPath, 0)
	adv := command(cmdPostcopyAdvise, 16)
	expect("page sizes", binary.BigEndian.Uint64(adv)|binary.BigEndian.Uint64(adv[8:]), migrationPage)
	expect("section start", uint64(c.u8()), vmSectionStart)
	expect("section id", uint64(c.be32()), testRAMID)
	if name := c.str(); name != "ram" {
		t.Fatalf("section %q", name)
	}
	c.be32()
	c.be32()
	expect("block list", c.be64(), 18*migrationPage|ramFlagMemSize)
	for _, b := range p.blocks {
		if name := c.str(); name != b.name {
			t.Fatalf("block %q, want %q", name, b.name)
		}
		expect("block length", c.be64(), b.length)
	}
	expect("end of section", c.be64(), ramFlagEOS)
	c.footer(testRAMID)
	c.take(len(p.ramParts))
	disc := command(cmdPostcopyDiscard, 1+1+3+1+16)
	if !bytes.Equal(disc[:6], []byte{0, 3, 'm', 'e', 'm', 0}) || binary.BigEndian.Uint64(disc[6:]) != 5*migrationPage {
		t.Fatalf("discard % x", disc)
	}
	size := binary.BigEndian.Uint32(command(cmdPackaged, 4))
	pkg := &streamCursor{b: c.take(int(size))}
	if !bytes.Equal(pkg.take(5), []byte{vmCommand, 0, cmdPostcopyListen, 0, 0}) ||
		!bytes.Equal(pkg.take(len(p.devices)), p.devices) ||
		!bytes.Equal(pkg.take(5), []byte{vmCommand, 0, cmdPostcopyRun, 0, 0}) || pkg.off != len(pkg.b) {
		t.Fatalf("package % x", pkg.b)
	}
	expect("part", uint64(c.u8()), vmSectionPart)
	expect("part id", uint64(c.be32()), testRAMID)
	expect("first page", c.be64(), 3*migrationPage|ramFlagPage)
	if name := c.str(); name != "mem" {
		t.Fatalf("block %q", name)
	}
	if !bytes.Equal(c.take(migrationPage), page) {
		t.Fatal("page data")
	}
	expect("zero page", c.be64(), 4*migrationPage|ramFlagZero|ramFlagContinue)
	expect("zero byte", uint64(c.u8()), 0)
	expect("end of part", c.be64(), ramFlagEOS)
	c.footer(testRAMID)
	expect("end", uint64(c.u8()), vmSectionEnd)
	expect("end id", uint64(c.be32()), testRAMID)
	expect("end of section", c.be64(), ramFlagEOS)
	c.footer(testRAMID)
	expect("end of file", uint64(c.u8()), vmEOF)
	if c.err != nil || c.off != len(c.b) {
		t.Fatalf("%d trailing bytes: %v", len(c.b)-c.off, c.err)
	}
}

func rpMsg(typ uint16, payload ...[]byte) []byte {
	body := bytes.Join(payload, nil)
	out := binary.BigEndian.AppendUint16(nil, typ)
	out = binary.BigEndian.AppendUint16(out, uint16(len(body)))
	return append(out, body...)
}

func be(v uint64, n int) []byte {
	b := binary.BigEndian.AppendUint64(nil, v)
	return b[8-n:]
}

func TestReadRPMessage(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []byte
		want rpMessage
		err  bool
	}{
		{"pages of a named block", rpMsg(rpReqPagesID, be(0x5000, 8), be(4096, 4), []byte{3, 'm', 'e', 'm'}), rpMessage{typ: rpReqPagesID, block: "mem", start: 0x5000, length: 4096}, false},
		{"pages of the same block", rpMsg(rpReqPages, be(0x6000, 8), be(8192, 4)), rpMessage{typ: rpReqPages, start: 0x6000, length: 8192}, false},
		{"shut", rpMsg(rpShut, be(0, 4)), rpMessage{typ: rpShut}, false},
		{"shut with an error", rpMsg(rpShut, be(1, 4)), rpMessage{typ: rpShut, status: 1}, false},
		{"pong", rpMsg(rpPong, be(9, 4)), rpMessage{typ: rpPong}, false},
		{"unknown type", rpMsg(9, be(0, 4)), rpMessage{}, true},
		{"short pages", rpMsg(rpReqPages, be(0x6000, 8)), rpMessage{}, true},
		{"pages with a name", rpMsg(rpReqPages, be(0x6000, 8), be(4096, 4), []byte{1, 'x'}), rpMessage{}, true},
		{"name longer than the message", rpMsg(rpReqPagesID, be(0, 8), be(4096, 4), []byte{9, 'm'}), rpMessage{}, true},
		{"empty name", rpMsg(rpReqPagesID, be(0, 8), be(4096, 4), []byte{0}), rpMessage{}, true},
		{"no bytes", rpMsg(rpReqPages, be(0, 8), be(0, 4)), rpMessage{}, true},
		{"unaligned", rpMsg(rpReqPages, be(100, 8), be(4096, 4)), rpMessage{}, true},
		{"too many bytes", rpMsg(rpReqPages, be(0, 8), be(1<<30, 4)), rpMessage{}, true},
		{"short shut", rpMsg(rpShut, be(0, 2)), rpMessage{}, true},
		{"truncated payload", rpMsg(rpShut, be(0, 4))[:6], rpMessage{}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := readRPMessage(bytes.NewReader(c.in))
			if c.err {
				if err == nil {
					t.Fatalf("readRPMessage = %+v, want an error", got)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("readRPMessage = %+v, %v; want %+v", got, err, c.want)
			}
		})
	}
	if _, err := readRPMessage(bytes.NewReader(nil)); !errors.Is(err, io.EOF) {
		t.Fatalf("readRPMessage at the end = %v, want io.EOF", err)
	}
}

func FuzzPlanPostcopy(f *testing.F) {
	f.Add(savedStream(f, nil))
	f.Add(savedStream(f, func(part string, _ *streamBuilder) bool { return part != "description" }))
	f.Fuzz(func(t *testing.T, state []byte) {
		p, err := planPostcopy(state)
		if err != nil {
			if !errors.Is(err, errStream) {
				t.Fatalf("error not errStream: %v", err)
			}
			return
		}
		if len(p.devices) > 0 && p.devices[0] != vmSectionFull {
			t.Fatalf("devices start with %#x", p.devices[0])
		}
		var total uint64
		for _, b := range p.blocks {
			total += b.length
		}
		if total == 0 {
			t.Fatal("a plan with no RAM")
		}
		var out bytes.Buffer
		pw := &postcopyWriter{w: bufio.NewWriter(&out)}
		if err := pw.prelude(p); err != nil {
			t.Fatal(err)
		}
		if err := pw.pack(p, 0); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzReadRPMessage(f *testing.F) {
	f.Add(rpMsg(rpReqPagesID, be(0x5000, 8), be(4096, 4), []byte{3, 'm', 'e', 'm'}))
	f.Add(rpMsg(rpReqPages, be(0x6000, 8), be(4096, 4)))
	f.Add(rpMsg(rpShut, be(0, 4)))
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			m, err := readRPMessage(r)
			if err != nil {
				return
			}
			if (m.typ == rpReqPages || m.typ == rpReqPagesID) && (m.length == 0 || m.length > maxRPRequest || m.start%migrationPage != 0) {
				t.Fatalf("accepted a bad request %+v", m)
			}
			if m.typ == rpReqPagesID && m.block == "" {
				t.Fatalf("accepted a request with no block")
			}
		}
	})
}
