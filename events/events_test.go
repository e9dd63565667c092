package events

import (
	"sync"
	"testing"
	"time"
)

// clock is a fake clock stepping one second per event.
func clocked(x *Exchange) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	x.now = func() time.Time { n++; return t0.Add(time.Duration(n) * time.Second) }
}

func TestSubscribeSince(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		keep      int
		published int
		since     time.Time
		wantSeqs  []uint64
	}{
		{"no since: nothing past", 10, 5, time.Time{}, nil},
		{"since the start", 10, 3, t0, []uint64{1, 2, 3}},
		{"since the middle", 10, 5, t0.Add(4 * time.Second), []uint64{4, 5}},
		{"ring wrapped: the oldest kept", 3, 7, t0, []uint64{5, 6, 7}},
		{"since after every event", 10, 3, t0.Add(time.Hour), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			x := New(tc.keep)
			clocked(x)
			for range tc.published {
				x.Publish(Event{Type: Created, Box: "a"})
			}
			s := x.Subscribe(tc.since)
			defer s.Close()
			var got []uint64
			for _, e := range s.Past {
				got = append(got, e.Seq)
			}
			if len(got) != len(tc.wantSeqs) {
				t.Fatalf("past %v, want %v", got, tc.wantSeqs)
			}
			for i := range got {
				if got[i] != tc.wantSeqs[i] {
					t.Fatalf("past %v, want %v", got, tc.wantSeqs)
				}
			}
		})
	}
}

// Events published while a listener subscribes reach it once each, in
// order, between Past and C.
func TestNoGapNoRepeat(t *testing.T) {
	x := New(2 * ListenerBuffer)
	const n = ListenerBuffer // C holds them all: no listener lags
	var wg sync.WaitGroup
	wg.Go(func() {
		for range n {
			x.Publish(Event{Type: Stopped})
		}
	})
	time.Sleep(time.Millisecond)
	s := x.Subscribe(time.Unix(1, 0))
	next := uint64(1)
	for _, e := range s.Past {
		if e.Seq != next {
			t.Fatalf("past: seq %d, want %d", e.Seq, next)
		}
		next++
	}
	for next <= n {
		e, ok := <-s.C
		if !ok {
			t.Fatalf("closed at seq %d (lagged %v)", next, s.Lagged())
		}
		if e.Seq != next {
			t.Fatalf("seq %d, want %d", e.Seq, next)
		}
		next++
	}
	wg.Wait()
	s.Close()
	s.Close()
}

func TestLaggingListenerDropped(t *testing.T) {
	x := New(0)
	slow := x.Subscribe(time.Time{})
	fast := x.Subscribe(time.Time{})
	var seen int
	for range ListenerBuffer + 10 {
		x.Publish(Event{Type: Created})
		<-fast.C
		seen++
	}
	n := 0
	for range slow.C {
		n++
	}
	if n != ListenerBuffer || !slow.Lagged() {
		t.Fatalf("slow listener got %d events, lagged %v; want %d and dropped", n, slow.Lagged(), ListenerBuffer)
	}
	if fast.Lagged() || seen != ListenerBuffer+10 {
		t.Fatalf("fast listener lagged %v, saw %d", fast.Lagged(), seen)
	}
	slow.Close() // after the exchange closed it
	fast.Close()
}

func TestObserveAndNil(t *testing.T) {
	var x *Exchange
	x.Publish(Event{Type: Created}) // drops it
	x = New(1)
	var got []string
	x.Observe(func(e Event) { got = append(got, e.Type+" "+e.Box) })
	x.Publish(Event{Type: Created, Box: "a"})
	x.Publish(Event{Type: Removed, Box: "a"})
	if len(got) != 2 || got[0] != "created a" || got[1] != "removed a" {
		t.Fatalf("observed %q", got)
	}
}
