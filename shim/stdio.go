package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"

	"github.com/containerd/fifo"
	"golang.org/x/sys/unix"
)

// stdio is a process's fifos, as containerd names them ("" for a stream
// not connected).
type stdio struct {
	stdin, stdout, stderr string
	terminal              bool
}

// openStreams are a process's open fifos: the ends the shim holds.
type openStreams struct {
	io     ProcessIO
	stdin  *stdinReader // nil without stdin
	closer []io.Closer
}

// open opens the fifos of s. Standard input is opened for reading in the
// background, so a client that never writes does not hold the start up;
// the outputs are opened read-write, which never blocks, and each write
// error is dropped (a reader gone away loses the output, not the process).
func (s stdio) open(ctx context.Context) (*openStreams, error) {
	o := &openStreams{}
	if s.stdin != "" {
		f, err := fifo.OpenFifo(ctx, s.stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("opening standard input %s: %w", s.stdin, err)
		}
		o.closer = append(o.closer, f)
		o.stdin = newStdinReader(f)
		o.io.Stdin = o.stdin
	}
	outputs := map[string]io.Writer{}
	for _, out := range []struct {
		path string
		w    *io.Writer
	}{{s.stdout, &o.io.Stdout}, {s.stderr, &o.io.Stderr}} {
		if out.path == "" {
			continue
		}
		if w, ok := outputs[out.path]; ok {
			*out.w = w
			continue
		}
		f, err := fifo.OpenFifo(ctx, out.path, syscall.O_RDWR, 0)
		if err != nil {
			o.close()
			return nil, fmt.Errorf("opening output %s: %w", out.path, err)
		}
		o.closer = append(o.closer, f)
		w := &lossyWriter{w: f}
		outputs[out.path] = w
		*out.w = w
	}
	return o, nil
}

// close closes every fifo end the shim holds: a reader of the outputs
// then sees their end once it has read what was written.
func (o *openStreams) close() {
	for _, c := range o.closer {
		_ = c.Close()
	}
}

// lossyWriter writes to w until it fails once, then drops what it is
// given: the process must not stall or fail because its reader left.
type lossyWriter struct {
	mu     sync.Mutex
	w      io.Writer
	failed bool
}

func (l *lossyWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.failed {
		if _, err := l.w.Write(p); err != nil {
			l.failed = true
		}
	}
	return len(p), nil
}

// stdinReader is standard input as the kept process's stream reads it.
// drained is closed once it has read the end (the client closed its
// writing end); passedOn says when all the client wrote so far was handed
// to the stream, so that closing the process's input loses none of it.
type stdinReader struct {
	r       io.Reader
	conn    syscall.RawConn // the fifo's, for the bytes it still holds
	once    sync.Once
	drained chan struct{}

	mu      sync.Mutex
	waiting bool // a Read waits for input, what it read before was taken
}

func newStdinReader(f io.Reader) *stdinReader {
	s := &stdinReader{r: f, drained: make(chan struct{})}
	if sc, ok := f.(syscall.Conn); ok {
		s.conn, _ = sc.SyscallConn()
	}
	return s
}

func (s *stdinReader) Read(p []byte) (int, error) {
	s.setWaiting(true)
	n, err := s.r.Read(p)
	s.setWaiting(false)
	if err != nil {
		s.once.Do(func() { close(s.drained) })
		if !errors.Is(err, io.EOF) {
			err = io.EOF // a fifo closed under the reader ends the input too
		}
	}
	return n, err
}

func (s *stdinReader) setWaiting(w bool) {
	s.mu.Lock()
	s.waiting = w
	s.mu.Unlock()
}

// passedOn says that the fifo holds no byte and the stream waits for
// more: every byte written before was passed on. A client may close its
// input (CloseIO) before it closes its end of the fifo.
func (s *stdinReader) passedOn() bool {
	s.mu.Lock()
	waiting := s.waiting
	s.mu.Unlock()
	if !waiting || s.conn == nil {
		return false
	}
	held := -1
	_ = s.conn.Control(func(fd uintptr) {
		held, _ = unix.IoctlGetInt(int(fd), unix.TIOCINQ) // FIONREAD: the bytes a pipe holds
	})
	return held == 0
}
