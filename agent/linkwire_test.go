package agent

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/containerd/errdefs"
)

// TestFrameRoundTrip encodes each kind of frame and decodes it back.
func TestFrameRoundTrip(t *testing.T) {
	tests := []frame{
		{typ: frameData, ack: 7, seq: 1 << 40, payload: []byte("payload")},
		{typ: frameData, payload: bytes.Repeat([]byte{0xab}, maxFramePayload)},
		{typ: frameAck, ack: 1 << 33, seq: 12},
		{typ: frameClose, ack: 1, seq: 2},
	}
	for _, f := range tests {
		enc := appendFrame(nil, f)
		got, err := readFrame(bufio.NewReader(bytes.NewReader(enc)), make([]byte, frameHeaderLen+maxFramePayload))
		if err != nil {
			t.Fatalf("%c frame: %v", f.typ, err)
		}
		if got.typ != f.typ || got.ack != f.ack || got.seq != f.seq || !bytes.Equal(got.payload, f.payload) {
			t.Errorf("%c frame came back as %c ack %d seq %d, %d bytes", f.typ, got.typ, got.ack, got.seq, len(got.payload))
		}
	}
}

// TestReadFrameRefuses: frames a channel change or another program could leave are errors, never data.
func TestReadFrameRefuses(t *testing.T) {
	good := appendFrame(nil, frame{typ: frameData, ack: 1, seq: 2, payload: []byte("abc")})
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x40
		return b
	}
	const sync = "BOXD-SYNC 0123456789abcdef\n"
	// header is the header of a data frame of n bytes whose checksum is the one of payload "abc".
	header := func(n uint32) []byte {
		h := appendFrame(nil, frame{typ: frameData, ack: 1, seq: 2, payload: []byte("abc")})[:frameHeaderLen]
		binary.BigEndian.PutUint32(h[17:21], n)
		return h
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	tests := []struct {
		name       string
		in         []byte
		newChannel bool // the error says the host opened a new channel, and holds the sync line read
	}{
		{name: "a preamble line", in: []byte(sync + sync), newChannel: true},
		// A guest frozen with part of a frame read, which the host's new channel follows.
		{name: "a frame cut in its payload", in: cat(header(maxFramePayload), []byte("abc"), []byte(sync+sync)), newChannel: true},
		{name: "a frame cut in its header", in: cat(good[:10], []byte(sync+sync)), newChannel: true},
		{name: "a sync line across the header's end", in: cat(good[:20], []byte(sync+sync)), newChannel: true},
		{name: "a sync line across the frame's end", in: cat(header(3+4), []byte("abc"), []byte(sync+sync)), newChannel: true},
		{name: "a frame cut before a near miss", in: cat(header(3+27), []byte("abcBOXD-SYNQ 0123456789abcdef\n"))},
		{name: "a bad frame ending like a sync line's start", in: cat(header(3+4), []byte("abcBOXD-SYNQ"))},
		{name: "a preamble line's start", in: []byte("BOXD-SYNQ 0123456789abcdef\n")},
		{name: "unknown type", in: flip(0)},
		{name: "changed ack", in: flip(3)},
		{name: "changed payload", in: flip(len(good) - 1)},
		{name: "empty data", in: appendFrame(nil, frame{typ: frameData})},
		{name: "ack with a payload", in: appendFrame(nil, frame{typ: frameAck, payload: []byte("x")})},
		{name: "oversized", in: appendFrame(nil, frame{typ: frameData, payload: make([]byte, maxFramePayload+1)})},
		{name: "cut short", in: good[:len(good)-1]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := readFrame(bufio.NewReader(bytes.NewReader(tt.in)), make([]byte, frameHeaderLen+maxFramePayload))
			if err == nil {
				t.Fatalf("read a %c frame of %d bytes", f.typ, len(f.payload))
			}
			if got := errors.Is(err, errNewChannel); got != tt.newChannel {
				t.Errorf("%v: a new channel %v, want %v", err, got, tt.newChannel)
			}
			var nce *newChannelError
			if tt.newChannel && (!errors.As(err, &nce) || !bytes.Equal(nce.rest, []byte(sync+sync))) {
				t.Errorf("%v: the new channel's bytes read are not its two sync lines", err)
			}
			if tt.in[0] != good[0] && !errors.Is(err, errBadFrame) && len(tt.in) >= frameHeaderLen {
				t.Errorf("%v is no bad frame", err)
			}
		})
	}
}

// FuzzReadFrame: whatever the bytes, readFrame returns a frame that encodes to exactly what it read, or an error.
func FuzzReadFrame(f *testing.F) {
	f.Add(appendFrame(nil, frame{typ: frameData, ack: 1, seq: 2, payload: []byte("abc")}))
	f.Add(appendFrame(nil, frame{typ: frameAck, ack: 5}))
	f.Add(appendFrame(nil, frame{typ: frameClose, seq: 9}))
	f.Add([]byte("BOXD-SYNC 0123456789abcdef\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		fr, err := readFrame(bufio.NewReader(bytes.NewReader(in)), make([]byte, frameHeaderLen+maxFramePayload))
		if err != nil {
			return
		}
		enc := appendFrame(nil, fr)
		if !bytes.HasPrefix(in, enc) {
			t.Fatalf("read %x, which encodes as %x", in, enc)
		}
	})
}

// TestParseHello parses the host's hellos and the guest's replies, and refuses near misses.
func TestParseHello(t *testing.T) {
	const id = "0123456789abcdef"
	hellos := []struct {
		line string
		want hello
		err  error
	}{
		{line: "SSH-2.0-boxd-link/1 new " + id + "\n", want: hello{id: id}},
		{line: "SSH-2.0-boxd-link/1 resume " + id + " 1234\n", want: hello{resume: true, id: id, recv: 1234}},
		{line: "SSH-2.0-boxd-link/2 new " + id + "\n", err: errLinkVersion},
		{line: "SSH-2.0-boxd-link/1 new " + id, err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/1 new 0123\n", err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/1 new " + id + " 0\n", err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/1 resume " + id + " 01\n", err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/1 resume " + id + " -1\n", err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/1  new " + id + "\n", err: errdefs.ErrInvalidArgument},
		{line: "SSH-2.0-boxd-link/01 new " + id + "\n", err: errdefs.ErrInvalidArgument},
	}
	for _, tt := range hellos {
		got, err := parseHello([]byte(tt.line))
		if tt.err != nil {
			if !errors.Is(err, tt.err) {
				t.Errorf("parseHello(%q) = %v, want %v", tt.line, err, tt.err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("parseHello(%q) = %+v, %v; want %+v", tt.line, got, err, tt.want)
		}
		if got.line() != tt.line {
			t.Errorf("hello %+v writes %q, want %q", got, got.line(), tt.line)
		}
	}
	replies := []struct {
		line string
		want helloReply
		bad  bool
	}{
		{line: "BOXD-LINK/1 ok " + id + " 0\n", want: helloReply{ok: true, id: id}},
		{line: "BOXD-LINK/1 refused unknown\n", want: helloReply{reason: refusedUnknown}},
		{line: "BOXD-LINK/1 refused position\n", want: helloReply{reason: refusedPosition}},
		{line: "BOXD-LINK/1 refused tired\n", bad: true},
		{line: "BOXD-LINK/1 ok " + id + "\n", bad: true},
		{line: "SSH-2.0-boxd-agent\r\n", bad: true},
	}
	for _, tt := range replies {
		got, err := parseReply([]byte(tt.line))
		if tt.bad {
			if err == nil {
				t.Errorf("parseReply(%q) = %+v, want an error", tt.line, got)
			}
			continue
		}
		if err != nil || got != tt.want || got.line() != tt.line {
			t.Errorf("parseReply(%q) = %+v, %v; want %+v", tt.line, got, err, tt.want)
		}
	}
}

// FuzzParseHello: a hello or reply that parses writes back as the very line it came from.
func FuzzParseHello(f *testing.F) {
	f.Add([]byte("SSH-2.0-boxd-link/1 new 0123456789abcdef\n"))
	f.Add([]byte("SSH-2.0-boxd-link/1 resume 0123456789abcdef 77\n"))
	f.Add([]byte("BOXD-LINK/1 ok 0123456789abcdef 5\n"))
	f.Add([]byte("BOXD-LINK/1 refused version\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		if h, err := parseHello(in); err == nil && h.line() != string(in) {
			t.Fatalf("hello %q writes back as %q", in, h.line())
		}
		if r, err := parseReply(in); err == nil && r.line() != string(in) {
			t.Fatalf("reply %q writes back as %q", in, r.line())
		}
	})
}
