package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

func (m *fakeManager) ConsolePath(name string) (string, error) {
	if err := m.record("console %s", name); err != nil {
		return "", err
	}
	if _, err := m.lookup(name); err != nil {
		return "", err
	}
	return filepath.Join(m.consoleDir, name+".log"), nil
}

// numbered is n lines, "line 1\n" to "line n\n".
func numbered(from, to int) string {
	var b strings.Builder
	for i := from; i <= to; i++ {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	return b.String()
}

func TestConsoleTail(t *testing.T) {
	long := numbered(1, 20000) // over several reads of consoleBuf
	for _, tc := range []struct {
		name    string
		content *string // nil: no file
		tail    int
		want    string
	}{
		{"no file", nil, -1, ""},
		{"no file, tail", nil, 5, ""},
		{"empty", ptr(""), -1, ""},
		{"empty, tail", ptr(""), 3, ""},
		{"all", ptr("a\nb\nc\n"), -1, "a\nb\nc\n"},
		{"none", ptr("a\nb\nc\n"), 0, ""},
		{"last", ptr("a\nb\nc\n"), 1, "c\n"},
		{"two", ptr("a\nb\nc\n"), 2, "b\nc\n"},
		{"exactly all", ptr("a\nb\nc\n"), 3, "a\nb\nc\n"},
		{"more than all", ptr("a\nb\nc\n"), 10, "a\nb\nc\n"},
		{"unended last line", ptr("a\nb\nc"), 1, "c"},
		{"unended, two", ptr("a\nb\nc"), 2, "b\nc"},
		{"one unended line", ptr("abc"), 1, "abc"},
		{"empty lines", ptr("\n\n\n"), 2, "\n\n"},
		{"a serial console's", ptr("boot\r\nboxd-agent: ready\r\n"), 1, "boxd-agent: ready\r\n"},
		{"long, all", &long, -1, long},
		{"long, across reads", &long, 7000, numbered(13001, 20000)},
		{"long, one", &long, 1, "line 20000\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "console.log")
			if tc.content != nil {
				if err := os.WriteFile(path, []byte(*tc.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			var out strings.Builder
			cs := consoleStream{path: path, tail: tc.tail}
			if err := cs.stream(context.Background(), &out); err != nil {
				t.Fatal(err)
			}
			if out.String() != tc.want {
				t.Errorf("tail %d: %q, want %q", tc.tail, short(out.String()), short(tc.want))
			}
		})
	}
}

func ptr(s string) *string { return &s }

// short shortens s for a failure message.
func short(s string) string {
	if len(s) > 200 {
		return s[:100] + "..." + s[len(s)-100:]
	}
	return s
}

// A followStep changes the console file (or the box) and says what the
// follow has written in all once it has seen the change.
type followStep struct {
	do   func(t *testing.T, path string)
	want string
}

func appendTo(s string) func(*testing.T, string) {
	return func(t *testing.T, path string) {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
	}
}

// remake deletes the file and makes another there holding s.
func remake(s string) func(*testing.T, string) {
	return func(t *testing.T, path string) {
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		appendTo(s)(t, path)
	}
}

// cut truncates the file to nothing, then writes s.
func cut(s string) func(*testing.T, string) {
	return func(t *testing.T, path string) {
		if err := os.Truncate(path, 0); err != nil {
			t.Fatal(err)
		}
		appendTo(s)(t, path)
	}
}

func TestConsoleFollow(t *testing.T) {
	for _, tc := range []struct {
		name    string
		content *string // nil: no file at first
		tail    int
		steps   []followStep
	}{
		{"appends", ptr("boot\n"), -1, []followStep{
			{appendTo("one\n"), "boot\none\n"},
			{appendTo("two"), "boot\none\ntwo"},
			{appendTo(" halves\n"), "boot\none\ntwo halves\n"},
		}},
		{"tail then appends", ptr("a\nb\nc\n"), 1, []followStep{
			{appendTo("d\n"), "c\nd\n"},
		}},
		{"tail 0: only what comes", ptr("a\nb\n"), 0, []followStep{
			{appendTo("c\n"), "c\n"},
		}},
		{"the file comes later", nil, -1, []followStep{
			{appendTo("first boot\n"), "first boot\n"},
			{appendTo("more\n"), "first boot\nmore\n"},
		}},
		{"the file comes later, tail", nil, 1, []followStep{
			// All of a console made after the follow began is new.
			{appendTo("x\ny\n"), "x\ny\n"},
		}},
		{"made anew", ptr("old\n"), -1, []followStep{
			{remake("new\n"), "old\nnew\n"},
			{appendTo("newer\n"), "old\nnew\nnewer\n"},
		}},
		{"cut short", ptr("a long first console\n"), -1, []followStep{
			{cut("short\n"), "a long first console\nshort\n"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "console.log")
			if tc.content != nil {
				appendTo(*tc.content)(t, path)
			}
			var gone atomic.Bool
			cs := consoleStream{path: path, tail: tc.tail, follow: true, poll: time.Millisecond, gone: gone.Load}
			out := &testutil.LockedBuffer{}
			done := make(chan error, 1)
			// The tail is written before the steps change the file.
			f, err := openTail(path, tc.tail)
			if err == nil {
				err = copyConsole(out, f)
			}
			if err != nil {
				t.Fatal(err)
			}
			go func() { done <- cs.followOn(context.Background(), out, f) }()
			for _, st := range tc.steps {
				st.do(t, path)
				out.WaitFor(t, st.want, 10*time.Second)
				if out.String() != st.want {
					t.Fatalf("followed %q, want %q", out.String(), st.want)
				}
			}
			// The box goes: what it wrote last still comes, then the
			// follow ends.
			want := out.String() + "removed\n"
			appendTo("removed\n")(t, path)
			gone.Store(true)
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the follow did not end when the box went")
			}
			if out.String() != want {
				t.Errorf("followed %q, want %q", out.String(), want)
			}
		})
	}

	t.Run("cancelled", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "console.log")
		appendTo("boot\n")(t, path)
		ctx, cancel := context.WithCancel(context.Background())
		cs := consoleStream{path: path, tail: -1, follow: true, poll: time.Millisecond, gone: func() bool { return false }}
		out := &testutil.LockedBuffer{}
		done := make(chan error, 1)
		go func() { done <- cs.stream(ctx, out) }()
		out.WaitFor(t, "boot\n", 10*time.Second)
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the follow did not end with its context")
		}
	})
}

// inFlight counts the requests h is serving.
type inFlight struct {
	h http.Handler
	n atomic.Int32
}

func (f *inFlight) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.n.Add(1)
	defer f.n.Add(-1)
	f.h.ServeHTTP(w, r)
}

// waitIdle waits until f serves no request, failing t after a while.
func (f *inFlight) waitIdle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for f.n.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still served", f.n.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLogs runs the logs through the API: tails, a box that has not run,
// an unknown box, and follows that end with the client, the box and the
// daemon.
func TestLogs(t *testing.T) {
	m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning}, box.Box{Name: "new", State: box.StateStopped})
	m.consoleDir = t.TempDir()
	console := filepath.Join(m.consoleDir, "dev.log")
	appendTo("boot\nboxd-agent: ready\n")(t, console)
	srv := newTestServer(m, &fakeGraph{})
	root := shortTempDir(t)
	l, err := listenSocket(SocketPath(root))
	if err != nil {
		t.Fatal(err)
	}
	handler := &inFlight{h: srv.Handler()}
	hs := &http.Server{Handler: handler}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	c := NewClient(root)
	ctx := context.Background()

	for _, tc := range []struct {
		name string
		opts LogsOptions
		want string
		err  error
	}{
		{"dev", LogsOptions{Tail: -1}, "boot\nboxd-agent: ready\n", nil},
		{"dev", LogsOptions{Tail: 1}, "boxd-agent: ready\n", nil},
		{"dev", LogsOptions{Tail: 0}, "", nil},
		{"new", LogsOptions{Tail: -1}, "", nil},
		{"nope", LogsOptions{Tail: -1}, "", errdefs.ErrNotFound},
		{"Bad_Name", LogsOptions{Tail: -1}, "", errdefs.ErrInvalidArgument},
	} {
		var out strings.Builder
		err := c.Logs(ctx, tc.name, tc.opts, &out)
		if out.String() != tc.want || (tc.err == nil) != (err == nil) || (tc.err != nil && !errors.Is(err, tc.err)) {
			t.Errorf("logs of %s %+v: %q, %v; want %q, %v", tc.name, tc.opts, out.String(), err, tc.want, tc.err)
		}
	}
	handler.waitIdle(t)

	// follow starts following box name's console, from its last line on,
	// and returns what it wrote and the channel of its end.
	follow := func(ctx context.Context, name string) (*testutil.LockedBuffer, <-chan error) {
		out := &testutil.LockedBuffer{}
		done := make(chan error, 1)
		go func() { done <- c.Logs(ctx, name, LogsOptions{Tail: 1, Follow: true}, out) }()
		return out, done
	}
	ended := func(done <-chan error, what string) error {
		t.Helper()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatalf("the follow did not end %s", what)
			return nil
		}
	}

	t.Run("the client goes away", func(t *testing.T) {
		fctx, cancel := context.WithCancel(ctx)
		out, done := follow(fctx, "dev")
		out.WaitFor(t, "boxd-agent: ready\n", 10*time.Second)
		appendTo("<3>hello\n")(t, console)
		out.WaitFor(t, "<3>hello\n", 10*time.Second)
		if got := out.String(); got != "boxd-agent: ready\n<3>hello\n" {
			t.Errorf("followed %q", got)
		}
		cancel()
		if err := ended(done, "with its context"); !errors.Is(err, context.Canceled) {
			t.Errorf("a cancelled follow: %v", err)
		}
		// Nothing is left in the daemon.
		handler.waitIdle(t)
	})

	t.Run("the box is removed", func(t *testing.T) {
		// Box new has not run: its console comes while it is followed.
		out, done := follow(ctx, "new")
		newConsole := filepath.Join(m.consoleDir, "new.log")
		appendTo("first boot\n")(t, newConsole)
		out.WaitFor(t, "first boot\n", 10*time.Second)
		appendTo("shutting down\n")(t, newConsole)
		if err := c.Remove(ctx, "new"); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(newConsole); err != nil {
			t.Fatal(err)
		}
		if err := ended(done, "when its box was removed"); err != nil {
			t.Errorf("a follow of a removed box: %v", err)
		}
		if got := out.String(); got != "first boot\nshutting down\n" {
			t.Errorf("a follow of a removed box wrote %q", got)
		}
		handler.waitIdle(t)
	})

	t.Run("the daemon stops", func(t *testing.T) {
		out, done := follow(ctx, "dev")
		out.WaitFor(t, "<3>hello\n", 10*time.Second)
		srv.EndStreams()
		if err := ended(done, "when the daemon stopped"); err != nil {
			t.Errorf("a follow the daemon ended: %v", err)
		}
		handler.waitIdle(t)
	})
}
