// Package events is what happened to boxes and the store, as the daemon
// tells it: the Event type, and an Exchange that keeps the recent ones and
// hands each new one, in order, to whoever listens.
package events

import (
	"sync"
	"time"
)

// Types of events.
const (
	Created    = "created"    // a box was made (from an image, or From a snapshot) and came up
	Forked     = "forked"     // Box was forked From a box, standing on Snapshot
	Started    = "started"    // a stopped box booted
	Stopped    = "stopped"    // a box's machine ended; Reason says why
	Paused     = "paused"     // a box's vCPUs stopped
	Unpaused   = "unpaused"   // a paused box runs on
	Hibernated = "hibernated" // a box went into Snapshot, freeing its memory; Reason says why
	Resumed    = "resumed"    // a hibernated box came back; Reason says why
	Snapshot   = "snapshot"   // Snapshot of a running box was committed
	Promoted   = "promoted"   // fork From took Box's place; Snapshot keeps Box's state before
	Removed    = "removed"    // a box was deleted
	Adopted    = "adopted"    // a box a previous daemon left running was taken over, running on
	GC         = "gc"         // the store's garbage was collected; Bytes were freed
)

// Reasons an event may give.
const (
	ReasonRequested = "requested"     // someone asked for it
	ReasonIdle      = "idle"          // the box was idle for the daemon's idle time
	ReasonUsed      = "used"          // an SSH connection or an exec reached the box
	ReasonShutdown  = "daemon exited" // the daemon was stopping
)

// Event is one thing that happened.
type Event struct {
	Seq  uint64    `json:"seq"` // 1, 2, ... in the order of the daemon's events since it started
	Time time.Time `json:"time"`
	Type string    `json:"type"`
	Box  string    `json:"box,omitempty"`
	// From is the box a fork or promotion came from, or the snapshot a
	// box was created from.
	From     string `json:"from,omitempty"`
	Snapshot string `json:"snapshot,omitempty"`
	Reason   string `json:"reason,omitempty"`
	// Took is how long the operation took, where it is one.
	Took  time.Duration `json:"took_ns,omitempty"`
	Bytes int64         `json:"bytes,omitempty"`
}

// DefaultKeep is how many recent events an Exchange keeps for listeners
// that ask for the past.
const DefaultKeep = 4096

// Exchange keeps the last events and passes each new one to every
// listener. The zero value is not ready; use New. A nil *Exchange takes
// events and drops them.
type Exchange struct {
	mu        sync.Mutex
	seq       uint64
	keep      int
	recent    []Event // a ring of at most keep, oldest at start
	start     int
	listeners map[*listener]struct{}
	observers []func(Event)
	now       func() time.Time
}

type listener struct {
	ch     chan Event
	lagged bool
}

// ListenerBuffer is how many events a listener may fall behind before it
// is dropped.
const ListenerBuffer = 1024

// New returns an Exchange keeping the last keep events (DefaultKeep if
// keep <= 0).
func New(keep int) *Exchange {
	if keep <= 0 {
		keep = DefaultKeep
	}
	return &Exchange{keep: keep, listeners: map[*listener]struct{}{}, now: time.Now}
}

// Publish numbers e, stamps it with the time unless it has one, keeps it,
// calls every observer and passes it to every listener. It never blocks
// on a listener: one that has fallen ListenerBuffer events behind is
// dropped (its channel closed, Lagged true).
func (x *Exchange) Publish(e Event) {
	if x == nil {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	x.seq++
	e.Seq = x.seq
	if e.Time.IsZero() {
		e.Time = x.now().UTC()
	}
	if len(x.recent) < x.keep {
		x.recent = append(x.recent, e)
	} else {
		x.recent[x.start] = e
		x.start = (x.start + 1) % x.keep
	}
	for _, f := range x.observers {
		f(e)
	}
	for l := range x.listeners {
		select {
		case l.ch <- e:
		default:
			l.lagged = true
			close(l.ch)
			delete(x.listeners, l)
		}
	}
}

// Observe calls f with every event published from now on, in order,
// while Publish holds the exchange: f must be quick and must not publish.
func (x *Exchange) Observe(f func(Event)) {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.observers = append(x.observers, f)
}

// Subscription is one listener's view: the kept events it asked for, then
// the new ones.
type Subscription struct {
	// Past are the kept events at or after the time asked for, oldest
	// first.
	Past []Event
	// C carries every later event, in order, each once; it is closed by
	// Close, or when the listener fell too far behind (Lagged).
	C <-chan Event

	x *Exchange
	l *listener
}

// Subscribe starts listening. Past holds the kept events at or after
// since (none for a zero since); C has every event after them, with no
// gap and none twice.
func (x *Exchange) Subscribe(since time.Time) *Subscription {
	l := &listener{ch: make(chan Event, ListenerBuffer)}
	x.mu.Lock()
	defer x.mu.Unlock()
	var past []Event
	if !since.IsZero() {
		for i := range x.recent {
			e := x.recent[(x.start+i)%len(x.recent)]
			if !e.Time.Before(since) {
				past = append(past, e)
			}
		}
	}
	x.listeners[l] = struct{}{}
	return &Subscription{Past: past, C: l.ch, x: x, l: l}
}

// Lagged reports whether the exchange dropped the listener for falling
// behind; it is meaningful once C is closed.
func (s *Subscription) Lagged() bool {
	s.x.mu.Lock()
	defer s.x.mu.Unlock()
	return s.l.lagged
}

// Close stops listening. It may be called more than once.
func (s *Subscription) Close() {
	s.x.mu.Lock()
	defer s.x.mu.Unlock()
	if _, ok := s.x.listeners[s.l]; ok {
		delete(s.x.listeners, s.l)
		close(s.l.ch)
	}
}
