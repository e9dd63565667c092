package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/containerd/errdefs"
)

// consolePoll is how often a follow looks for what was appended to a
// console, and whether its box is gone.
const consolePoll = 150 * time.Millisecond

// consoleBuf is what one read of a console takes, and one write of it.
const consoleBuf = 32 << 10

// LogsOptions say what of a box's logs Client.Logs writes.
//
// A box's logs are its serial console, which QEMU appends to a file
// (box.Manager.ConsolePath) across the box's boots, restores and
// hibernations. GET /v1/boxes/{name}/logs answers the file's bytes as
// they are, as text/plain. Its query holds the options: ?tail=N (absent:
// all of the file) and ?follow=1. An unknown box and a bad query are the
// API's usual JSON errors; a box that has not run yet has no file, and
// empty logs. A follow holds no box lock and does not count as a use of
// the box: a box followed may still be hibernated when idle.
type LogsOptions struct {
	// Tail is how many of the console's last lines to write (a last line
	// without its newline counts); negative means all of it.
	Tail int
	// Follow goes on writing what is appended to the console, as it
	// comes, until the client goes away, the box is removed (what it
	// wrote last comes first) or the daemon stops serving; the answer
	// then ends as usual.
	Follow bool
}

// Logs writes box name's console to w (see LogsOptions). It
// returns nil when the console's end is written or, with opts.Follow,
// when the box was removed or the daemon stopped; ctx's error when ctx
// ended first.
func (c *Client) Logs(ctx context.Context, name string, opts LogsOptions, w io.Writer) error {
	q := url.Values{}
	if opts.Tail >= 0 {
		q.Set("tail", strconv.Itoa(opts.Tail))
	}
	if opts.Follow {
		q.Set("follow", "1")
	}
	path := boxPath(name, "logs")
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	resp, err := c.open(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	buf := make([]byte, consoleBuf)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return fmt.Errorf("writing box %s's console: %w", name, err)
			}
		}
		switch {
		case rerr == nil:
		case errors.Is(rerr, io.EOF):
			return nil
		case ctx.Err() != nil:
			return ctx.Err()
		default:
			return fmt.Errorf("boxd daemon at %s: box %s's console broke off (%w): %w", c.socket, name, rerr, errdefs.ErrUnavailable)
		}
	}
}

// boxLogs answers box name's console (see LogsOptions).
func (s *Server) boxLogs(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	var cs consoleStream
	if err == nil {
		cs, err = parseLogsQuery(r.URL.Query())
	}
	if err == nil {
		cs.path, err = s.mgr.ConsolePath(name)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	cs.poll = consolePoll
	cs.gone = func() bool {
		_, err := s.mgr.Get(name)
		return errors.Is(err, errdefs.ErrNotFound)
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	defer context.AfterFunc(s.streaming, cancel)()

	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	// The client hears at once that the box is there, even when its
	// console has nothing to follow yet.
	_ = rc.Flush()
	err = cs.stream(ctx, flushWriter{w, rc})
	if err != nil && r.Context().Err() == nil {
		// The answer has begun: breaking the connection off tells the
		// client that it is not whole.
		s.log.Warn("logs", "box", name, "err", err)
		panic(http.ErrAbortHandler)
	}
}

// parseLogsQuery reads ?tail and ?follow.
func parseLogsQuery(q url.Values) (consoleStream, error) {
	cs := consoleStream{tail: -1}
	if q.Has("tail") {
		n, err := strconv.Atoi(q.Get("tail"))
		if err != nil || n < 0 {
			return cs, fmt.Errorf("logs: tail %q: want a number of lines, 0 or more: %w", q.Get("tail"), errdefs.ErrInvalidArgument)
		}
		cs.tail = n
	}
	if q.Has("follow") {
		f, err := strconv.ParseBool(q.Get("follow"))
		if err != nil {
			return cs, fmt.Errorf("logs: follow %q: want 1 or 0: %w", q.Get("follow"), errdefs.ErrInvalidArgument)
		}
		cs.follow = f
	}
	return cs, nil
}

// flushWriter sends each write to the client at once.
type flushWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (f flushWriter) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	if err == nil {
		err = f.rc.Flush()
	}
	return n, err
}

// consoleStream is what of a console file stream writes.
type consoleStream struct {
	path string
	// tail is how many of the file's last lines to write first; negative
	// means all of it.
	tail int
	// follow goes on with what is appended, looking every poll, until
	// gone reports that the box is gone or the context ends.
	follow bool
	poll   time.Duration
	gone   func() bool
}

// stream writes the console to w: its last cs.tail lines and, with
// cs.follow, what comes after them (followOn). It returns nil at the end
// (of the file, or of the follow), and the error of a read or of a write
// to w.
func (cs consoleStream) stream(ctx context.Context, w io.Writer) error {
	f, err := openTail(cs.path, cs.tail)
	if err != nil {
		return err
	}
	if err := copyConsole(w, f); err != nil || !cs.follow {
		if f != nil {
			f.Close()
		}
		return err
	}
	return cs.followOn(ctx, w, f)
}

// followOn writes what is appended to the console from f's offset on
// (from the start of the file once one is made, when f is nil), looking
// every cs.poll, until ctx ends or cs.gone reports that the box is gone.
// It closes f.
//
// A console only grows; followOn also reads on from the start of a file
// made anew at the path (the box removed and made again, which its gone
// check may miss between two looks) or cut short.
func (cs consoleStream) followOn(ctx context.Context, w io.Writer, f *os.File) error {
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	t := time.NewTicker(cs.poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		// Asked before the last read, so that what the box wrote until
		// it was removed is written.
		gone := cs.gone()
		if err := copyConsole(w, f); err != nil || gone {
			return err
		}
		var err error
		if f, err = cs.reopen(f); err != nil {
			return err
		}
		if err := copyConsole(w, f); err != nil {
			return err
		}
	}
}

// openTail opens the console at path where its last n lines begin (at its
// start when n is negative); with no file there, it returns nil.
func openTail(path string, n int) (*os.File, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	st, err := f.Stat()
	if err == nil {
		var off int64
		if off, err = tailStart(f, st.Size(), n); err == nil {
			_, err = f.Seek(off, io.SeekStart)
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("console: %w", err)
	}
	return f, nil
}

// tailStart returns the offset in r, size bytes long, where its last n
// lines begin: all of r when n is negative. A last line without its
// newline counts as a line.
func tailStart(r io.ReaderAt, size int64, n int) (int64, error) {
	if n < 0 {
		return 0, nil
	}
	if n == 0 {
		return size, nil
	}
	buf := make([]byte, consoleBuf)
	seen := 0
	for end := size; end > 0; {
		start := max(end-int64(len(buf)), 0)
		p := buf[:end-start]
		if _, err := r.ReadAt(p, start); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		for i := len(p) - 1; i >= 0; i-- {
			// The file's last byte, a newline, ends the last line.
			if p[i] != '\n' || start+int64(i) == size-1 {
				continue
			}
			if seen++; seen == n {
				return start + int64(i) + 1, nil
			}
		}
		end = start
	}
	return 0, nil
}

// copyConsole writes what f holds from its offset on to w; a nil f holds
// nothing.
func copyConsole(w io.Writer, f *os.File) error {
	if f == nil {
		return nil
	}
	buf := make([]byte, consoleBuf)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("console: %w", err)
		}
	}
}

// reopen returns the console file to read on from: f, read to its end,
// when it is still the file at the path; the file at the path from its
// start when it is another (f is closed) or when f was cut short below
// what was read; nil while there is none.
func (cs consoleStream) reopen(f *os.File) (*os.File, error) {
	st, err := os.Stat(cs.path)
	if errors.Is(err, fs.ErrNotExist) {
		// Not made yet, or deleted with its box: f, if any, is read on.
		return f, nil
	}
	if err != nil {
		return f, fmt.Errorf("console: %w", err)
	}
	if f != nil {
		cur, err := f.Seek(0, io.SeekCurrent)
		if err != nil {
			return f, fmt.Errorf("console: %w", err)
		}
		if fst, err := f.Stat(); err == nil && os.SameFile(st, fst) {
			if st.Size() >= cur {
				return f, nil
			}
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return f, fmt.Errorf("console: %w", err)
			}
			return f, nil
		}
		f.Close()
	}
	return openTail(cs.path, -1)
}
