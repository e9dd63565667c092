package agent

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strconv"

	"github.com/containerd/errdefs"
)

// The link's wire format. A link (see link.go) starts on a fresh channel, after the preamble, with one hello line
// each way, then carries frames until the channel breaks:
//
//	host:  SSH-2.0-boxd-link/1 new <id>\n             start link <id>, dropping any other
//	host:  SSH-2.0-boxd-link/1 resume <id> <recv>\n   go on with link <id>; the host holds <recv> bytes of the guest's
//	guest: BOXD-LINK/1 ok <id> <recv>\n               agreed; the guest holds <recv> bytes of the host's
//	guest: BOXD-LINK/1 refused <reason>\n             no such link (<reason>: unknown, position or version)
//
// <id> is 16 to 64 lowercase hex digits, <recv> a decimal count without leading zeros. The host's hello looks like
// an SSH version line on purpose: an agent without the link takes it for the client's and answers at once with its
// own version line, which the host recognises (errNoLink) instead of waiting for a reply that never comes.
//
// A frame is a 25-byte header and a payload, integers big-endian:
//
//	type  1 byte   'D' data, 'A' acknowledgement, 'C' close (the sender closed the link)
//	ack   8 bytes  how many bytes of the stream it receives the sender has read: the peer may forget them
//	seq   8 bytes  the position in the sender's stream of the payload's first byte (of the next byte, without one)
//	len   4 bytes  the payload's length: 1 to maxFramePayload for data, 0 otherwise
//	crc   4 bytes  CRC-32C of the header's first 21 bytes and the payload
//
// The checksum makes a frame spoilt by a channel change (a frame cut short in an old QEMU whose rest is a new
// host's preamble) an error that breaks the channel, never bytes delivered.
const (
	linkVersion     = 1
	linkHelloPrefix = "SSH-2.0-boxd-link/"
	linkReplyPrefix = "BOXD-LINK/"
	frameHeaderLen  = 25
	maxFramePayload = 32 << 10
	// maxLinkLine bounds a hello or reply line, its '\n' included.
	maxLinkLine = 200
)

// Frame types.
const (
	frameData  = 'D'
	frameAck   = 'A'
	frameClose = 'C'
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// frame is one frame of the link.
type frame struct {
	typ     byte
	ack     uint64
	seq     uint64
	payload []byte
}

// errBadFrame is what breaks a channel whose bytes are no frame.
var errBadFrame = errors.New("agent: link: bad frame")

// errNewChannel is a sync line where a frame was due: the host opened a new channel (a box resumed or moved onto
// another machine, or the host's end of the old one broke), and the guest's session on the old one ends, as the
// preamble means it to. It is routine, not worth a line in the box's log.
var errNewChannel = fmt.Errorf("%w: a sync line: the host opened a new channel", errBadFrame)

// newChannelError is errNewChannel with what the reader had taken of the new channel: the start of the sync line
// and the bytes it had read past it. The guest answers that sync line on the same port (Serve).
type newChannelError struct {
	rest []byte
}

func (e *newChannelError) Error() string { return errNewChannel.Error() }
func (e *newChannelError) Unwrap() error { return errNewChannel }

// appendFrame appends f's encoding to b.
func appendFrame(b []byte, f frame) []byte {
	start := len(b)
	b = append(b, f.typ)
	b = binary.BigEndian.AppendUint64(b, f.ack)
	b = binary.BigEndian.AppendUint64(b, f.seq)
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.payload)))
	sum := crc32.Update(crc32.Checksum(b[start:], crcTable), crcTable, f.payload)
	b = binary.BigEndian.AppendUint32(b, sum)
	return append(b, f.payload...)
}

// readFrame reads one frame from r into buf, which must hold frameHeaderLen+maxFramePayload bytes; the payload
// it returns is part of buf.
//
// A host's sync line that begins among the frame's bytes means the frame was cut short by a channel change: the
// guest was frozen (a snapshot, a fork, a move) with part of a frame read, its rest went with the old QEMU, and
// the new channel's preamble follows. The error is then a *newChannelError holding the line's start and what was
// read past it, whether the line came where the header was due, inside the header or payload, or across the
// frame's end. Without that, a guest frozen in a frame's payload would take the new channel's sync lines for the
// rest of the payload and answer none until its host gave up on the channel.
func readFrame(r *bufio.Reader, buf []byte) (frame, error) {
	if err := readWatching(r, buf, 0, frameHeaderLen); err != nil {
		return frame{}, err
	}
	h := buf[:frameHeaderLen]
	f := frame{typ: h[0], ack: binary.BigEndian.Uint64(h[1:9]), seq: binary.BigEndian.Uint64(h[9:17])}
	n := binary.BigEndian.Uint32(h[17:21])
	var bad error
	switch {
	case f.typ == frameData && (n == 0 || n > maxFramePayload):
		bad = fmt.Errorf("%w: data of %d bytes", errBadFrame, n)
	case (f.typ == frameAck || f.typ == frameClose) && n != 0:
		bad = fmt.Errorf("%w: a %q frame with a payload", errBadFrame, f.typ)
	case f.typ != frameData && f.typ != frameAck && f.typ != frameClose:
		bad = fmt.Errorf("%w: type %#x", errBadFrame, f.typ)
	}
	if bad != nil {
		return frame{}, syncAtEnd(r, h, bad)
	}
	end := frameHeaderLen + int(n)
	if err := readWatching(r, buf, frameHeaderLen, end); err != nil {
		return frame{}, err
	}
	f.payload = buf[frameHeaderLen:end]
	if crc32.Update(crc32.Checksum(h[:21], crcTable), crcTable, f.payload) != binary.BigEndian.Uint32(h[21:]) {
		return frame{}, syncAtEnd(r, buf[:end], fmt.Errorf("%w: checksum", errBadFrame))
	}
	return f, nil
}

// readWatching fills buf[from:to] from r, as io.ReadFull does, but stops at a sync line that begins in buf[:to]
// (a *newChannelError). buf[:from] was read already, and held no sync line.
func readWatching(r *bufio.Reader, buf []byte, from, to int) error {
	have := from
	for have < to {
		n, err := r.Read(buf[have:to])
		if n > 0 {
			scan := max(0, have-len(syncPrefix)+1) // a line that began in the bytes before
			have += n
			if i := bytes.Index(buf[scan:have], []byte(syncPrefix)); i >= 0 {
				return newChannel(r, buf[scan+i:have])
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) && have > from {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// syncAtEnd returns err, the reason the frame b was refused, unless b ends with the start of a sync line that r
// goes on with: then the new channel began there (a *newChannelError).
func syncAtEnd(r *bufio.Reader, b []byte, err error) error {
	// The prefix's bytes are all different, so at most one of its starts ends b.
	for k := min(len(syncPrefix)-1, len(b)); k > 0; k-- {
		if !bytes.HasSuffix(b, []byte(syncPrefix[:k])) {
			continue
		}
		if more, perr := r.Peek(len(syncPrefix) - k); perr == nil && string(more) == syncPrefix[k:] {
			return newChannel(r, b[len(b)-k:])
		}
		break
	}
	return err
}

// newChannel is the *newChannelError for a sync line that begins at start, the last bytes read from r.
func newChannel(r *bufio.Reader, start []byte) error {
	held, _ := r.Peek(r.Buffered())
	rest := make([]byte, 0, len(start)+len(held))
	return &newChannelError{rest: append(append(rest, start...), held...)}
}

// hello is the host's first line on a channel.
type hello struct {
	resume bool
	id     string
	recv   uint64 // with resume: the bytes of the guest's stream the host holds
}

func (h hello) line() string {
	if h.resume {
		return fmt.Sprintf("%s%d resume %s %d\n", linkHelloPrefix, linkVersion, h.id, h.recv)
	}
	return fmt.Sprintf("%s%d new %s\n", linkHelloPrefix, linkVersion, h.id)
}

// errLinkVersion is a hello or reply of a link version this agent does not speak.
var errLinkVersion = fmt.Errorf("agent: link: another link version than %d: %w", linkVersion, errdefs.ErrNotImplemented)

// isLinkHello says whether line (as read, with its '\n') is meant as a link hello, of any version.
func isLinkHello(line []byte) bool { return bytes.HasPrefix(line, []byte(linkHelloPrefix)) }

// parseHello parses a hello line, with its '\n'. A well-formed hello of another version is errLinkVersion.
func parseHello(line []byte) (hello, error) {
	fields, err := linkFields(line, linkHelloPrefix)
	if err != nil {
		return hello{}, err
	}
	switch {
	case len(fields) == 2 && fields[0] == "new" && isLinkID(fields[1]):
		return hello{id: fields[1]}, nil
	case len(fields) == 3 && fields[0] == "resume" && isLinkID(fields[1]):
		recv, err := parseCount(fields[2])
		if err != nil {
			return hello{}, err
		}
		return hello{resume: true, id: fields[1], recv: recv}, nil
	}
	return hello{}, fmt.Errorf("agent: link: bad hello %q: %w", line, errdefs.ErrInvalidArgument)
}

// helloReply is the guest's answer to a hello.
type helloReply struct {
	ok     bool
	id     string
	recv   uint64 // with ok: the bytes of the host's stream the guest holds
	reason string // without ok: one of unknown, position, version
}

// Reasons of a refusal.
const (
	refusedUnknown  = "unknown"
	refusedPosition = "position"
	refusedVersion  = "version"
)

func (r helloReply) line() string {
	if r.ok {
		return fmt.Sprintf("%s%d ok %s %d\n", linkReplyPrefix, linkVersion, r.id, r.recv)
	}
	return fmt.Sprintf("%s%d refused %s\n", linkReplyPrefix, linkVersion, r.reason)
}

// parseReply parses a reply line, with its '\n'.
func parseReply(line []byte) (helloReply, error) {
	fields, err := linkFields(line, linkReplyPrefix)
	if err != nil {
		return helloReply{}, err
	}
	switch {
	case len(fields) == 3 && fields[0] == "ok" && isLinkID(fields[1]):
		recv, err := parseCount(fields[2])
		if err != nil {
			return helloReply{}, err
		}
		return helloReply{ok: true, id: fields[1], recv: recv}, nil
	case len(fields) == 2 && fields[0] == "refused" &&
		(fields[1] == refusedUnknown || fields[1] == refusedPosition || fields[1] == refusedVersion):
		return helloReply{reason: fields[1]}, nil
	}
	return helloReply{}, fmt.Errorf("agent: link: bad reply %q: %w", line, errdefs.ErrInvalidArgument)
}

// linkFields checks a hello or reply line's prefix, version and end and returns its other fields.
func linkFields(line []byte, prefix string) ([]string, error) {
	rest, ok := bytes.CutPrefix(line, []byte(prefix))
	body, nl := bytes.CutSuffix(rest, []byte("\n"))
	if !ok || !nl || len(line) > maxLinkLine {
		return nil, fmt.Errorf("agent: link: bad line %q: %w", line, errdefs.ErrInvalidArgument)
	}
	fields := bytes.Split(body, []byte(" "))
	v, err := parseCount(string(fields[0]))
	if err != nil {
		return nil, err
	}
	if v != linkVersion {
		return nil, fmt.Errorf("%w (it speaks %d)", errLinkVersion, v)
	}
	out := make([]string, 0, len(fields)-1)
	for _, f := range fields[1:] {
		out = append(out, string(f))
	}
	return out, nil
}

// parseCount parses a decimal count without sign or leading zeros.
func parseCount(s string) (uint64, error) {
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || strconv.FormatUint(n, 10) != s {
		return 0, fmt.Errorf("agent: link: bad count %q: %w", s, errdefs.ErrInvalidArgument)
	}
	return n, nil
}

// isLinkID says whether s is a link id: 16 to 64 lowercase hex digits.
func isLinkID(s string) bool { return len(s) >= 16 && isNonce([]byte(s)) }
