package testutil

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"
)

// LockedBuffer is a bytes.Buffer that goroutines may write to and read at
// once (a console, a process's stdout and stderr, a logger), and that can
// wait for a text to appear in it; its zero value is empty and ready.
type LockedBuffer struct {
	mu      sync.Mutex
	b       bytes.Buffer
	waiters []waiter
}

// waiter is a text a caller of Seen waits for, and the channel closed when
// the buffer holds it.
type waiter struct {
	text string
	seen chan struct{}
}

// Write appends p to the buffer.
func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	old := l.b.Len()
	n, err := l.b.Write(p)
	kept := l.waiters[:0]
	for _, w := range l.waiters {
		// Only the bytes that can take part in a new match are searched,
		// so a console written a byte at a time stays linear.
		if bytes.Contains(l.b.Bytes()[max(0, old-len(w.text)+1):], []byte(w.text)) {
			close(w.seen)
		} else {
			kept = append(kept, w)
		}
	}
	clear(l.waiters[len(kept):])
	l.waiters = kept
	return n, err
}

// String returns what the buffer holds.
func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Bytes returns a copy of what the buffer holds.
func (l *LockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// Seen returns a channel that is closed once the buffer holds text (at
// once if it does already).
func (l *LockedBuffer) Seen(text string) <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	ch := make(chan struct{})
	if strings.Contains(l.b.String(), text) {
		close(ch)
		return ch
	}
	l.waiters = append(l.waiters, waiter{text, ch})
	return ch
}

// WaitFor waits until the buffer holds text, and fails t with what it holds
// if that takes longer than timeout.
func (l *LockedBuffer) WaitFor(t testing.TB, text string, timeout time.Duration) {
	t.Helper()
	select {
	case <-l.Seen(text):
	case <-time.After(timeout):
		t.Fatalf("%q has not come within %v; got %q", text, timeout, l.String())
	}
}
