package shim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

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
// an output is written once its reader has opened it (see output), and
// each write error is dropped (a reader gone away loses the output, not
// the process). The fifos outlive ctx, the start request's.
func (s stdio) open(ctx context.Context) (*openStreams, error) {
	ctx = context.WithoutCancel(ctx)
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
		f, err := openOutput(out.path, readerWait)
		if err != nil {
			o.abandon()
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
// then sees their end once it has read what was written. An output whose
// reader has not come yet is waited for, at most readerWait from its
// opening.
func (o *openStreams) close() {
	for _, c := range o.closer {
		_ = c.Close()
	}
}

// abandon closes every fifo end the shim holds without waiting for an
// output's reader.
func (o *openStreams) abandon() {
	for _, c := range o.closer {
		if out, ok := c.(*output); ok {
			out.abandon()
		}
		_ = c.Close()
	}
}

// readerWait bounds how long an output waits for its reader to open it:
// the writes and the close wait, then what the process writes is dropped.
const readerWait = 30 * time.Second

// output is a process's output fifo as the shim writes it. Its writing
// end is opened only once a reader has the fifo open: a reader whose
// open(2) begins after the last writer closed would wait for a writer
// forever, and the bytes written before would go with the pipe. That is
// not rare under load: containerd opens its reading end in a goroutine of
// its own, and a short process (an exec of "exit 5") can start, end and
// close its outputs before that goroutine runs. Once a reader came, the
// shim holds the fifo read-write, so a reader that goes away (containerd
// restarting) finds what was written meanwhile when it comes back, as
// with runc's shim.
type output struct {
	path    string
	ready   chan struct{} // closed once f is open or the wait ended
	stop    chan struct{} // closed by abandon
	stopped sync.Once
	f       *os.File // nil when no reader came
	err     error    // why f is nil
}

// openOutput opens the output fifo at path: at once when a reader has it
// open, or else in the background once one does, until wait has passed.
func openOutput(path string, wait time.Duration) (*output, error) {
	if fi, err := os.Stat(path); err != nil {
		return nil, err
	} else if fi.Mode()&os.ModeNamedPipe == 0 {
		return nil, fmt.Errorf("%s is not a fifo", path)
	}
	o := &output{path: path, ready: make(chan struct{}), stop: make(chan struct{})}
	f, err := openForReader(path)
	switch {
	case err == nil:
		o.f = f
		close(o.ready)
	case errors.Is(err, unix.ENXIO):
		go o.await(time.Now().Add(wait))
	default:
		return nil, err
	}
	return o, nil
}

// openForReader opens the fifo at path read-write once a reader has it
// open (one blocked in its open(2) counts, and is woken); ENXIO says none
// has.
func openForReader(path string) (*os.File, error) {
	probe, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(probe)
	return os.OpenFile(path, os.O_RDWR, 0)
}

func (o *output) await(deadline time.Time) {
	defer close(o.ready)
	for {
		f, err := openForReader(o.path)
		if err == nil {
			o.f = f
			return
		}
		if !errors.Is(err, unix.ENXIO) {
			o.err = err
			return
		}
		if time.Now().After(deadline) {
			o.err = fmt.Errorf("no reader opened %s", o.path)
			return
		}
		select {
		case <-o.stop:
			o.err = fmt.Errorf("%s closed before a reader opened it", o.path)
			return
		case <-time.After(pollEvery):
		}
	}
}

// Write writes p once the reader came, and fails when none did.
func (o *output) Write(p []byte) (int, error) {
	<-o.ready
	if o.f == nil {
		return 0, o.err
	}
	return o.f.Write(p)
}

// Close waits for the reader, bounded as the writes are, and closes the
// shim's end.
func (o *output) Close() error {
	<-o.ready
	if o.f == nil {
		return nil
	}
	return o.f.Close()
}

// abandon stops waiting for the reader.
func (o *output) abandon() { o.stopped.Do(func() { close(o.stop) }) }

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
