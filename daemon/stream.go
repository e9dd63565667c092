package daemon

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/errcat"
)

// ExecProtocol is the Upgrade token of a streaming exec.
//
// The client sends POST /v1/boxes/{name}/exec with "Connection: Upgrade",
// "Upgrade: boxd-exec/1" and an ExecRequest as its JSON body (Stdin
// empty). A request the daemon refuses (a bad name, no command, an unknown
// box) gets the API's usual JSON error. Otherwise the daemon answers
// "101 Switching Protocols" and from then on both sides send frames on the
// connection: a kind byte, the payload's length as a big-endian uint32
// (at most MaxFrame), and the payload.
//
// From the client: stdin (bytes for the command's standard input),
// close-stdin (no payload: the input ends; sent once, also when there is
// no input at all) and resize (the pty's new rows and columns, two
// big-endian uint16s). From the daemon: stdout and stderr (the command's
// output as it is written), then one last frame, exit (the exit status, a
// big-endian int32, as agent.Client.Run reports it) or error (an API error
// object: the command could not be run), and the daemon closes the
// connection. A client that goes away ends the command.
const ExecProtocol = "boxd-exec/1"

// Frame kinds of the exec stream (see ExecProtocol).
const (
	frameStdin      byte = 0
	frameStdout     byte = 1
	frameStderr     byte = 2
	frameCloseStdin byte = 3
	frameResize     byte = 4
	frameExit       byte = 5
	frameError      byte = 6
)

// MaxFrame bounds a frame's payload; writers split larger writes.
const MaxFrame = 32 << 10

const frameHeader = 5

// frameWriter writes frames on one connection for several writers.
type frameWriter struct {
	mu sync.Mutex // serialises frames
	w  io.Writer
}

// frame writes one frame of kind with payload p (at most MaxFrame bytes).
func (f *frameWriter) frame(kind byte, p []byte) error {
	buf := make([]byte, frameHeader+len(p))
	buf[0] = kind
	binary.BigEndian.PutUint32(buf[1:], uint32(len(p)))
	copy(buf[frameHeader:], p)
	f.mu.Lock()
	defer f.mu.Unlock()
	_, err := f.w.Write(buf)
	return err
}

// stream returns a writer whose writes become frames of kind, each sent at
// once.
func (f *frameWriter) stream(kind byte) io.Writer { return streamWriter{f, kind} }

type streamWriter struct {
	f    *frameWriter
	kind byte
}

func (s streamWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), MaxFrame)]
		if err := s.f.frame(s.kind, chunk); err != nil {
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
	return n, nil
}

// resizeFrame is the payload of a resize frame.
func resizeFrame(ws agent.WindowSize) []byte {
	var b [4]byte
	binary.BigEndian.PutUint16(b[0:], uint16(min(max(ws.Rows, 0), 0xffff)))
	binary.BigEndian.PutUint16(b[2:], uint16(min(max(ws.Cols, 0), 0xffff)))
	return b[:]
}

// exitFrame is the payload of an exit frame.
func exitFrame(code int) []byte {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(int32(code)))
	return b[:]
}

// streamErrorBody is the payload of an error frame: the API's error
// object, and on a kept process's stream whether the daemon lost the
// process's agent before its exit status (agent.ErrDetached: the process
// runs on, and the client may attach again).
type streamErrorBody struct {
	errorBody
	Detached bool `json:"detached,omitempty"`
}

// errorFrame is the payload of an error frame: err as a streamErrorBody.
func errorFrame(err error) []byte {
	cat, _ := Category(err)
	b, _ := json.Marshal(streamErrorBody{errorBody{Error: err.Error(), Category: cat}, errors.Is(err, agent.ErrDetached)})
	return b
}

// errFrameTooLarge is a frame over MaxFrame: a peer that does not speak
// the protocol.
var errFrameTooLarge = errors.New("exec stream: frame over the size limit")

// readFrame reads one frame from r into buf (grown as needed) and returns
// its kind and payload, valid until the next call.
func readFrame(r io.Reader, buf *[]byte) (byte, []byte, error) {
	var h [frameHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("%w: %d bytes", errFrameTooLarge, n)
	}
	if cap(*buf) < int(n) {
		*buf = make([]byte, n)
	}
	p := (*buf)[:n]
	if _, err := io.ReadFull(r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return h[0], p, nil
}

// streamError rebuilds the error an error frame carries.
func streamError(p []byte) error {
	var eb streamErrorBody
	if err := json.Unmarshal(p, &eb); err != nil || eb.Error == "" {
		eb = streamErrorBody{errorBody: errorBody{Error: "boxd daemon: the command could not be run", Category: categoryUnknown}}
	}
	status := http.StatusInternalServerError
	if r, ok := errcat.Named(eb.Category); ok {
		status = r.HTTP
	}
	e := remoteError(status, eb.errorBody)
	e.detached = eb.Detached
	return e
}
