package qemu

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

// The parts of QEMU 7.2's migration protocol (migration/savevm.c,
// migration/migration.c, migration/ram.c) that a postcopy restore speaks
// as the migration's source: boxd plays the source, QEMU the destination.
const (
	vmCommand       = 0x08
	vmVMDescription = 0x06

	cmdOpenReturnPath  = 1
	cmdPostcopyAdvise  = 3
	cmdPostcopyListen  = 4
	cmdPostcopyRun     = 5
	cmdPostcopyDiscard = 6
	cmdPackaged        = 7

	rpShut       = 1
	rpPong       = 2
	rpReqPagesID = 3
	rpReqPages   = 4
)

// ramBlock is one RAM block of a machine, as the RAM section lists them.
type ramBlock struct {
	name   string
	length uint64
}

// postcopyPlan is a machine's saved device state (stripRAM's output: no
// pages of guest RAM) taken apart into what a postcopy restore sends
// around the pages: the header, the RAM section's start, the small RAM
// blocks' pages, and the devices, which QEMU loads from one package.
type postcopyPlan struct {
	header     []byte // magic, version and the configuration section, less its capabilities
	ramID      uint32
	ramInst    uint32
	ramVersion uint32
	blocks     []ramBlock
	ramParts   []byte // the RAM section's parts after its start, each as a part with its footer
	devices    []byte // the non-iterable sections with their footers, up to the end of file
}

// streamCursor reads a saved stream held in memory, strictly: the first
// short read or bad value sticks in err.
type streamCursor struct {
	b   []byte
	off int
	err error
}

func (c *streamCursor) fail(format string, args ...any) {
	if c.err == nil {
		c.err = fmt.Errorf("%w: %s", errStream, fmt.Sprintf(format, args...))
	}
}

func (c *streamCursor) take(n int) []byte {
	if c.err != nil {
		return nil
	}
	if n < 0 || len(c.b)-c.off < n {
		c.fail("ends early at byte %d", c.off)
		return nil
	}
	b := c.b[c.off : c.off+n]
	c.off += n
	return b
}

func (c *streamCursor) u8() byte {
	if b := c.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (c *streamCursor) peek() int {
	if c.err != nil || c.off >= len(c.b) {
		return -1
	}
	return int(c.b[c.off])
}

func (c *streamCursor) be32() uint32 {
	if b := c.take(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (c *streamCursor) be64() uint64 {
	if b := c.take(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

func (c *streamCursor) str() string { return string(c.take(int(c.u8()))) }

// footer reads a section footer, which must name section id.
func (c *streamCursor) footer(id uint32) {
	if t := c.u8(); t != vmSectionFooter {
		c.fail("section %d: footer %#x, want %#x", id, t, vmSectionFooter)
		return
	}
	if got := c.be32(); got != id && c.err == nil {
		c.fail("footer of section %d inside section %d", got, id)
	}
}

// planPostcopy takes saved device state apart for a postcopy restore. It
// fails on anything it does not understand rather than guess.
func planPostcopy(state []byte) (*postcopyPlan, error) {
	c := &streamCursor{b: state}
	p := &postcopyPlan{}
	var header []byte
	if magic, ver := c.be32(), c.be32(); c.err == nil && (magic != vmFileMagic || ver != vmFileVersion) {
		c.fail("header %#x version %d, want QEVM version 3", magic, ver)
	}
	if t := c.u8(); c.err == nil && t != vmConfiguration {
		c.fail("section %#x where the configuration belongs", t)
	}
	n := c.be32()
	c.take(int(n))
	if c.err != nil {
		return nil, c.err
	}
	header = append(header, state[:c.off]...)
	for c.err == nil && c.peek() == vmSubsection {
		sub := c.off
		c.u8()
		name := c.str()
		c.be32() // version
		switch name {
		case "configuration/target-page-bits":
			c.be32()
		case "configuration/capabilities":
			// The capabilities the saving QEMU had (x-ignore-shared): the
			// restoring QEMU runs without it until its memory is in place.
			for range c.be32() {
				c.str()
			}
			continue
		case "configuration/uuid":
			c.take(16)
		default:
			c.fail("configuration subsection %q", name)
		}
		header = append(header, state[sub:c.off]...)
	}
	p.header = header
	started := false
	for c.err == nil {
		at := c.off
		switch t := c.u8(); t {
		case vmSectionStart:
			id := c.be32()
			name := c.str()
			inst, ver := c.be32(), c.be32()
			if c.err == nil && (name != ramSectionIDStr || started) {
				c.fail("live section %q: only one RAM section is understood", name)
				break
			}
			started = true
			p.ramID, p.ramInst, p.ramVersion = id, inst, ver
			p.blocks = c.ramBlocks()
			c.footer(id)
		case vmSectionPart, vmSectionEnd:
			id := c.be32()
			if c.err == nil && (!started || id != p.ramID) {
				c.fail("part of section %d, which is not RAM", id)
				break
			}
			c.ramRecords()
			c.footer(id)
			if c.err == nil {
				part := append([]byte{vmSectionPart}, state[at+1:c.off]...)
				p.ramParts = append(p.ramParts, part...)
			}
		case vmSectionFull, vmEOF:
			if c.err == nil && !started {
				c.fail("no RAM section")
				break
			}
			end, err := deviceStateEnd(state, at)
			if err != nil {
				return nil, err
			}
			p.devices = state[at:end]
			return p, nil
		default:
			c.fail("section type %#x at byte %d", t, at)
		}
	}
	return nil, c.err
}

// ramBlocks reads the RAM section's start: the block list (saved with
// x-ignore-shared, so each block carries its address) up to its end of
// section.
func (c *streamCursor) ramBlocks() []ramBlock {
	var blocks []ramBlock
	for c.err == nil {
		v := c.be64()
		switch flags := v & ramFlagMask; {
		case c.err != nil:
		case flags == ramFlagEOS:
			if len(blocks) == 0 {
				c.fail("RAM section lists no blocks")
			}
			return blocks
		case flags == ramFlagMemSize:
			total := v &^ ramFlagMask
			for total > 0 && c.err == nil {
				b := ramBlock{name: c.str(), length: c.be64()}
				c.be64() // the block's address
				if c.err == nil && (b.length > total || b.name == "" || b.length%migrationPage != 0) {
					c.fail("RAM block %q of %d bytes does not fit its list", b.name, b.length)
				}
				total -= b.length
				blocks = append(blocks, b)
			}
		default:
			c.fail("RAM setup record with flags %#x", flags)
		}
	}
	return nil
}

// ramRecords reads a RAM part's page records up to its end of section:
// those of the small blocks, guest RAM's having been stripped.
func (c *streamCursor) ramRecords() {
	named := false
	for c.err == nil {
		v := c.be64()
		flags := v & ramFlagMask
		switch {
		case c.err != nil:
			return
		case flags == ramFlagEOS:
			return
		case flags&^ramFlagContinue != ramFlagZero && flags&^ramFlagContinue != ramFlagPage:
			c.fail("RAM record with flags %#x", flags)
			return
		}
		if flags&ramFlagContinue == 0 {
			if name := c.str(); name == guestRAMBlockStr {
				c.fail("a page of guest RAM in saved device state")
			}
			named = true
		} else if !named {
			c.fail("a RAM record continues no block")
		}
		if flags&ramFlagZero != 0 {
			c.take(1)
		} else {
			c.take(migrationPage)
		}
	}
}

// deviceStateEnd returns where the device sections that start at from end:
// at the end-of-file byte, which the stream's last byte is, or which its
// trailing JSON description (QEMU_VM_VMDESCRIPTION, length-prefixed)
// follows. The sections between must chain: each a full section whose
// footer names it, followed by the next or by the end.
func deviceStateEnd(state []byte, from int) (int, error) {
	n := len(state)
	end := -1
	for p := n - 5; p > from && end < 0; p-- {
		if state[p] == vmVMDescription && state[p-1] == vmEOF &&
			int(binary.BigEndian.Uint32(state[p+1:])) == n-p-5 && n-p-5 > 0 && state[p+5] == '{' {
			end = p - 1
		}
	}
	if end < 0 && n > from && state[n-1] == vmEOF {
		end = n - 1
	}
	if end < 0 || !sectionsChain(state, from, end) {
		return 0, fmt.Errorf("%w: device state has no end of file after its sections", errStream)
	}
	return end, nil
}

// sectionsChain says whether state[from:end] is a chain of full sections,
// each ended by a footer that names it.
func sectionsChain(state []byte, from, end int) bool {
	for from < end {
		id, body, ok := fullHeader(state, from, end)
		if !ok {
			return false
		}
		next := -1
		for q := body; q+5 <= end; q++ {
			if state[q] != vmSectionFooter || binary.BigEndian.Uint32(state[q+1:]) != id {
				continue
			}
			if q+5 == end {
				next = end
				break
			}
			if _, _, ok := fullHeader(state, q+5, end); ok {
				next = q + 5
				break
			}
		}
		if next < 0 {
			return false
		}
		from = next
	}
	return from == end
}

// fullHeader reads the header of a full section at state[at:end]: its id
// and where its body starts. The section's name must be printable.
func fullHeader(state []byte, at, end int) (id uint32, body int, ok bool) {
	if end-at < 1+4+1 || state[at] != vmSectionFull {
		return 0, 0, false
	}
	id = binary.BigEndian.Uint32(state[at+1:])
	nameLen := int(state[at+5])
	body = at + 6 + nameLen + 8 // name, instance, version
	if nameLen == 0 || body > end {
		return 0, 0, false
	}
	for _, ch := range state[at+6 : at+6+nameLen] {
		if ch < 0x20 || ch > 0x7e {
			return 0, 0, false
		}
	}
	return id, body, true
}

// postcopyWriter writes the source's side of a postcopy restore.
type postcopyWriter struct {
	w   *bufio.Writer
	buf [16]byte
}

func (pw *postcopyWriter) be16(v uint16) {
	binary.BigEndian.PutUint16(pw.buf[:2], v)
	_, _ = pw.w.Write(pw.buf[:2])
}

func (pw *postcopyWriter) be32(v uint32) {
	binary.BigEndian.PutUint32(pw.buf[:4], v)
	_, _ = pw.w.Write(pw.buf[:4])
}

func (pw *postcopyWriter) be64(v uint64) {
	binary.BigEndian.PutUint64(pw.buf[:8], v)
	_, _ = pw.w.Write(pw.buf[:8])
}

func (pw *postcopyWriter) str(s string) {
	_ = pw.w.WriteByte(byte(len(s)))
	_, _ = pw.w.WriteString(s)
}

// command writes a QEMU_VM_COMMAND with its payload.
func (pw *postcopyWriter) command(cmd uint16, payload []byte) {
	_ = pw.w.WriteByte(vmCommand)
	pw.be16(cmd)
	pw.be16(uint16(len(payload)))
	_, _ = pw.w.Write(payload)
}

// prelude writes everything before the pages: the header, the return
// path's opening, postcopy's advice, the RAM section's start (the block
// list without addresses: the restoring QEMU runs without x-ignore-shared),
// and the small blocks' pages. Pages sent after it and before pack are
// loaded as in a precopy migration.
func (pw *postcopyWriter) prelude(p *postcopyPlan) error {
	_, _ = pw.w.Write(p.header)
	pw.command(cmdOpenReturnPath, nil)
	var advise [16]byte
	binary.BigEndian.PutUint64(advise[:8], migrationPage) // the host page sizes of the blocks, ORed
	binary.BigEndian.PutUint64(advise[8:], migrationPage) // the target page size
	pw.command(cmdPostcopyAdvise, advise[:])
	_ = pw.w.WriteByte(vmSectionStart)
	pw.be32(p.ramID)
	pw.str(ramSectionIDStr)
	pw.be32(p.ramInst)
	pw.be32(p.ramVersion)
	var total uint64
	for _, b := range p.blocks {
		total += b.length
	}
	pw.be64(total | ramFlagMemSize)
	for _, b := range p.blocks {
		pw.str(b.name)
		pw.be64(b.length)
	}
	pw.be64(ramFlagEOS)
	pw.footer(p.ramID)
	_, _ = pw.w.Write(p.ramParts)
	return nil
}

// pack writes the package that makes QEMU listen for pages, load the
// devices and be ready to run.
//
// Before it goes a discard of one page not sent yet: QEMU 7.2, listening
// without a discard first, leaves its postcopy state at "discard" (its
// first discard's set-up runs after the state became "listening"), and
// then loads pages that come before the devices are loaded as precopy
// pages, writing into registered memory: a device whose loading reads
// guest RAM (kvmvapic, virtio's rings) would wait forever.
func (pw *postcopyWriter) pack(p *postcopyPlan, discard uint64) error {
	payload := []byte{0, byte(len(guestRAMBlockStr))} // version 0, the block
	payload = append(payload, guestRAMBlockStr...)
	payload = append(payload, 0) // the name's terminator
	payload = binary.BigEndian.AppendUint64(payload, discard)
	payload = binary.BigEndian.AppendUint64(payload, migrationPage)
	pw.command(cmdPostcopyDiscard, payload)
	const cmdLen = 5 // a command with no payload
	var size [4]byte
	binary.BigEndian.PutUint32(size[:], uint32(cmdLen+len(p.devices)+cmdLen))
	pw.command(cmdPackaged, size[:])
	pw.command(cmdPostcopyListen, nil)
	_, _ = pw.w.Write(p.devices)
	pw.command(cmdPostcopyRun, nil)
	return pw.w.Flush()
}

func (pw *postcopyWriter) footer(id uint32) {
	_ = pw.w.WriteByte(vmSectionFooter)
	pw.be32(id)
}

// pages writes one RAM part: the pages of block at offsets (bytes), data
// holding each page in turn, and zero pages (zero[i]) as zero records.
func (pw *postcopyWriter) pages(ramID uint32, block string, offsets []uint64, data []byte, zero []bool) error {
	_ = pw.w.WriteByte(vmSectionPart)
	pw.be32(ramID)
	for i, off := range offsets {
		flags := uint64(ramFlagPage)
		if zero[i] {
			flags = ramFlagZero
		}
		if i > 0 {
			flags |= ramFlagContinue
		}
		pw.be64(off | flags)
		if i == 0 {
			pw.str(block)
		}
		if zero[i] {
			_ = pw.w.WriteByte(0)
		} else {
			_, _ = pw.w.Write(data[i*migrationPage : (i+1)*migrationPage])
		}
	}
	pw.be64(ramFlagEOS)
	pw.footer(ramID)
	return pw.w.Flush()
}

// end closes the RAM section and the stream: QEMU then finishes the
// migration and leaves the pages it never asked for to the kernel, which
// fills them with zeros.
func (pw *postcopyWriter) end(ramID uint32) error {
	_ = pw.w.WriteByte(vmSectionEnd)
	pw.be32(ramID)
	pw.be64(ramFlagEOS)
	pw.footer(ramID)
	_ = pw.w.WriteByte(vmEOF)
	return pw.w.Flush()
}

// rpMessage is one message on the return path, QEMU to boxd.
type rpMessage struct {
	typ    uint16
	block  string // REQ_PAGES_ID's block; "" for REQ_PAGES (the last one named)
	start  uint64 // REQ_PAGES*: the first byte asked for, in the block
	length uint32 // REQ_PAGES*: bytes asked for
	status uint32 // SHUT's status: 0 for a clean end
}

// maxRPRequest bounds a page request's length; QEMU asks for one host page.
const maxRPRequest = 1 << 21

// readRPMessage reads one return-path message (be16 type, be16 length,
// payload), strictly: a message of a known type with the wrong length, or
// of an unknown type, is an error.
func readRPMessage(r io.Reader) (rpMessage, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return rpMessage{}, err
	}
	m := rpMessage{typ: binary.BigEndian.Uint16(hdr[:2])}
	payload := make([]byte, binary.BigEndian.Uint16(hdr[2:]))
	if _, err := io.ReadFull(r, payload); err != nil {
		return rpMessage{}, fmt.Errorf("%w: return path ends in a message: %w", errStream, io.ErrUnexpectedEOF)
	}
	bad := func() (rpMessage, error) {
		return rpMessage{}, fmt.Errorf("%w: return path message %d of %d bytes", errStream, m.typ, len(payload))
	}
	switch m.typ {
	case rpShut:
		if len(payload) != 4 {
			return bad()
		}
		m.status = binary.BigEndian.Uint32(payload)
	case rpPong:
		if len(payload) != 4 {
			return bad()
		}
	case rpReqPages, rpReqPagesID:
		if len(payload) < 12 {
			return bad()
		}
		m.start = binary.BigEndian.Uint64(payload)
		m.length = binary.BigEndian.Uint32(payload[8:])
		rest := payload[12:]
		if m.typ == rpReqPages && len(rest) != 0 {
			return bad()
		}
		if m.typ == rpReqPagesID {
			if len(rest) < 2 || int(rest[0]) != len(rest)-1 {
				return bad()
			}
			m.block = string(rest[1:])
		}
		if m.length == 0 || m.length > maxRPRequest || m.start%migrationPage != 0 {
			return bad()
		}
	default:
		return bad()
	}
	return m, nil
}
