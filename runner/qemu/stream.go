package qemu

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// QEMU's migration stream (migration/savevm.h and migration/ram.c of QEMU
// 7.2): the parts stripRAM reads.
const (
	vmFileMagic   = 0x5145564d // "QEVM"
	vmFileVersion = 3

	vmEOF            = 0x00
	vmSectionStart   = 0x01
	vmSectionPart    = 0x02
	vmSectionEnd     = 0x03
	vmSectionFull    = 0x04
	vmSubsection     = 0x05
	vmConfiguration  = 0x07
	vmSectionFooter  = 0x7e
	ramFlagZero      = 0x02
	ramFlagMemSize   = 0x04
	ramFlagPage      = 0x08
	ramFlagEOS       = 0x10
	ramFlagContinue  = 0x20
	ramFlagMask      = 0xfff // flags live in the page offset's low bits
	migrationPage    = 4096
	ramSectionIDStr  = "ram"
	guestRAMBlockStr = "mem" // the memory backend's id
)

// errStream says the stream is not one stripRAM understands.
var errStream = errors.New("qemu: migration stream")

// stripRAM copies a migration stream from r to w without the pages of the
// guest RAM block: what is left is the machine's device state (and the
// small ROM blocks), which a QEMU whose guest RAM is already in place — a
// mapping of the snapshot's memory file — loads as it is. Migrating a
// machine whose RAM is private (share=off) sends every page even with
// x-ignore-shared; boxd captures those pages itself, so the stream keeps
// only what it cannot get elsewhere. It returns the pages it dropped.
func stripRAM(r io.Reader, w io.Writer) (dropped int64, err error) {
	s := newStreamFilter(r, w)
	if err := s.run(); err != nil {
		return s.dropped, err
	}
	return s.dropped, s.w.Flush()
}

// splitRAM reads the stream of a migration that carries guest RAM, one
// saved without x-ignore-shared (liveCopy), hands each record of the guest
// RAM block to put (its offset in the block, and the page, or nil for a
// page of zeros) and copies the rest to w as stripRAM would have left a
// stream saved with x-ignore-shared: the device state a restore loads. The
// block addresses that x-ignore-shared adds to the RAM block list are
// written as 0, the address of the guest RAM block of the x86 machines boxd
// runs (a restoring QEMU checks it for that block alone, and fails loudly
// on a mismatch).
func splitRAM(r io.Reader, w io.Writer, put func(off int64, zero bool) ([]byte, error)) error {
	s := newStreamFilter(r, w)
	s.live, s.put = true, put
	if err := s.run(); err != nil {
		return err
	}
	return s.w.Flush()
}

func newStreamFilter(r io.Reader, w io.Writer) *streamFilter {
	return &streamFilter{r: bufio.NewReaderSize(r, 1<<20), w: bufio.NewWriterSize(w, 1<<16), ramID: -1, memSize: -1}
}

type streamFilter struct {
	r     *bufio.Reader
	w     *bufio.Writer
	ramID int64  // the ram section's id, -1 before it starts
	block string // the RAM block of the last page record
	// lastKept is the block of the last record written out.
	lastKept string
	dropped  int64
	err      error // the first read or write error
	// live: the stream was saved without x-ignore-shared (splitRAM), and
	// the copy gets what that capability adds; put takes the guest RAM
	// block's records.
	live      bool
	put       func(off int64, zero bool) ([]byte, error)
	capsAdded bool
	memSize   int64 // the guest RAM block's size, -1 before the block list
}

func (s *streamFilter) run() error {
	if magic, ver := s.be32(true), s.be32(true); magic != vmFileMagic || ver != vmFileVersion {
		return s.fail(fmt.Errorf("%w: header %#x version %d, want QEVM version 3", errStream, magic, ver))
	}
	for {
		typ := s.byte(true)
		if s.err != nil {
			return s.fail(nil)
		}
		switch typ {
		case vmConfiguration:
			s.configuration()
		case vmSectionStart:
			id := s.be32(true)
			name := s.str(true)
			s.be32(true) // instance
			s.be32(true) // version
			if name != ramSectionIDStr {
				return s.fail(fmt.Errorf("%w: live section %q: only RAM is understood", errStream, name))
			}
			s.ramID = int64(id)
			s.ramSetup()
		case vmSectionPart, vmSectionEnd:
			if id := s.be32(true); int64(id) != s.ramID {
				return s.fail(fmt.Errorf("%w: part of section %d, which is not RAM", errStream, id))
			}
			s.ramPages()
		case vmSectionFooter:
			s.be32(true)
		case vmSectionFull, vmEOF:
			// Device state from here on: copy the rest as it is.
			_, err := io.Copy(s.w, s.r)
			return err
		default:
			return s.fail(fmt.Errorf("%w: unknown section type %#x", errStream, typ))
		}
		if s.err != nil {
			return s.fail(nil)
		}
	}
}

// configuration copies the configuration section: the machine type and
// its subsections. A live stream gains the subsection that says the saving
// QEMU had x-ignore-shared, where QEMU puts it (after the target's page
// size, before the uuid).
func (s *streamFilter) configuration() {
	n := s.be32(true)
	s.bytes(int(n), true)
	for s.err == nil {
		b, err := s.r.Peek(1)
		if err != nil || b[0] != vmSubsection {
			break
		}
		s.byte(false)
		name := s.str(false)
		if name == "configuration/uuid" {
			s.addCapabilities()
		}
		s.putByte(vmSubsection)
		s.putStr(name)
		s.be32(true) // version
		switch name {
		case "configuration/target-page-bits":
			s.be32(true)
		case "configuration/capabilities":
			if s.live {
				s.setErr(fmt.Errorf("%w: a live stream with capabilities", errStream))
				return
			}
			for range s.be32(true) {
				s.str(true)
			}
		case "configuration/uuid":
			s.bytes(16, true)
		default:
			s.setErr(fmt.Errorf("%w: configuration subsection %q", errStream, name))
			return
		}
	}
	s.addCapabilities()
}

// addCapabilities writes, once, in a live stream's configuration, the
// subsection of the capabilities QEMU checks on load: x-ignore-shared,
// which the restoring QEMU has.
func (s *streamFilter) addCapabilities() {
	if !s.live || s.capsAdded {
		return
	}
	s.capsAdded = true
	s.putByte(vmSubsection)
	s.putStr("configuration/capabilities")
	s.put32(1) // version
	s.put32(1) // count
	s.putStr("x-ignore-shared")
}

// ramSetup copies the RAM section's start: the block list.
func (s *streamFilter) ramSetup() {
	for s.err == nil {
		v := s.be64(true)
		switch flags := v & ramFlagMask; {
		case flags&ramFlagEOS != 0:
			return
		case flags&ramFlagMemSize != 0:
			total := v &^ ramFlagMask
			for total > 0 && s.err == nil {
				name := s.str(true)
				used := s.be64(true)
				if s.live {
					s.put64(0) // the block's address, which x-ignore-shared adds
				} else {
					s.be64(true) // the block's address: boxd migrates with x-ignore-shared
				}
				if name == guestRAMBlockStr {
					s.memSize = int64(used)
				}
				if used > total {
					s.setErr(fmt.Errorf("%w: RAM block list overruns its total", errStream))
					return
				}
				total -= used
			}
		default:
			s.setErr(fmt.Errorf("%w: RAM setup record with flags %#x", errStream, flags))
		}
	}
}

// ramPages copies a RAM part up to its end of section, less the pages of
// the guest RAM block.
func (s *streamFilter) ramPages() {
	for s.err == nil {
		v := s.be64(false)
		flags := v & ramFlagMask
		if flags&ramFlagEOS != 0 {
			s.put64(v)
			return
		}
		if flags&(ramFlagZero|ramFlagPage) == 0 {
			s.setErr(fmt.Errorf("%w: RAM record with flags %#x", errStream, flags))
			return
		}
		if flags&ramFlagContinue == 0 {
			s.block = s.str(false)
		}
		keep := s.block != guestRAMBlockStr
		if keep {
			// The stream names a block once and continues it after; a kept
			// record after dropped ones must name its block again.
			if flags&ramFlagContinue != 0 && s.lastKept != s.block {
				v &^= ramFlagContinue
			}
			s.put64(v)
			if v&ramFlagContinue == 0 {
				s.putStr(s.block)
			}
			s.lastKept = s.block
		} else {
			s.dropped++
		}
		if !keep && s.put != nil {
			s.putPage(v, flags)
			continue
		}
		n := migrationPage
		if flags&ramFlagZero != 0 {
			n = 1
		}
		if keep {
			s.bytes(n, true)
		} else {
			s.skip(n)
		}
	}
}

// putPage reads the data of a record of the guest RAM block (v, with its
// flags) into the buffer put gives for it.
func (s *streamFilter) putPage(v, flags uint64) {
	off := int64(v &^ ramFlagMask)
	if off%migrationPage != 0 || off+migrationPage > s.memSize {
		s.setErr(fmt.Errorf("%w: page at %#x outside guest RAM of %d bytes", errStream, off, s.memSize))
		return
	}
	zero := flags&ramFlagZero != 0
	if zero {
		if fill := s.byte(false); fill != 0 {
			s.setErr(fmt.Errorf("%w: page at %#x filled with %#x", errStream, off, fill))
			return
		}
	}
	if s.err != nil {
		return
	}
	dst, err := s.put(off, zero)
	if err != nil {
		s.setErr(err)
		return
	}
	if !zero {
		if _, err := io.ReadFull(s.r, dst[:migrationPage]); err != nil {
			s.setErr(err)
		}
	}
}

func (s *streamFilter) setErr(err error) {
	if s.err == nil {
		s.err = err
	}
}

func (s *streamFilter) fail(err error) error {
	s.setErr(err)
	if errors.Is(s.err, io.EOF) || errors.Is(s.err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: ends early: %w", errStream, io.ErrUnexpectedEOF)
	}
	return s.err
}

// skip drops n bytes of the stream.
func (s *streamFilter) skip(n int) {
	if s.err != nil {
		return
	}
	if _, err := s.r.Discard(n); err != nil {
		s.setErr(err)
	}
}

// bytes reads n bytes, copying them to w when keep.
func (s *streamFilter) bytes(n int, keep bool) []byte {
	if s.err != nil {
		return nil
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(s.r, b); err != nil {
		s.setErr(err)
		return nil
	}
	if keep {
		if _, err := s.w.Write(b); err != nil {
			s.setErr(err)
		}
	}
	return b
}

func (s *streamFilter) byte(keep bool) byte {
	b := s.bytes(1, keep)
	if b == nil {
		return 0
	}
	return b[0]
}

func (s *streamFilter) be32(keep bool) uint32 {
	b := s.bytes(4, keep)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

func (s *streamFilter) be64(keep bool) uint64 {
	b := s.bytes(8, keep)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// str reads a string with a one-byte length.
func (s *streamFilter) str(keep bool) string {
	n := s.byte(keep)
	return string(s.bytes(int(n), keep))
}

func (s *streamFilter) put64(v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := s.w.Write(b[:]); err != nil {
		s.setErr(err)
	}
}

func (s *streamFilter) put32(v uint32) {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	if _, err := s.w.Write(b[:]); err != nil {
		s.setErr(err)
	}
}

func (s *streamFilter) putByte(b byte) {
	if err := s.w.WriteByte(b); err != nil {
		s.setErr(err)
	}
}

func (s *streamFilter) putStr(str string) {
	if err := s.w.WriteByte(byte(len(str))); err != nil {
		s.setErr(err)
	}
	if _, err := s.w.WriteString(str); err != nil {
		s.setErr(err)
	}
}
