package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/events"
	"github.com/containerd/errdefs"
)

// The event stream: kept events since a time, then new ones in order; a
// gc is told; the stream ends when the daemon stops; bad input is refused.
func TestEventsStream(t *testing.T) {
	x := events.New(0)
	g := &fakeGraph{}
	srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g, Events: x})
	c := serve(t, srv)
	ctx := context.Background()

	x.Publish(events.Event{Type: events.Created, Box: "old"})
	since := time.Now()
	x.Publish(events.Event{Type: events.Created, Box: "a"})

	got := make(chan events.Event, 16)
	done := make(chan error, 1)
	go func() {
		done <- c.Events(ctx, since, func(e events.Event) error { got <- e; return nil })
	}()
	next := func() events.Event {
		t.Helper()
		select {
		case e := <-got:
			return e
		case err := <-done:
			t.Fatalf("the stream ended: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no event")
		}
		return events.Event{}
	}
	if e := next(); e.Type != events.Created || e.Box != "a" || e.Seq != 2 {
		t.Fatalf("first event %+v, want the kept creation of a (seq 2)", e)
	}
	x.Publish(events.Event{Type: events.Forked, Box: "b", From: "a", Took: time.Second})
	if e := next(); e.Type != events.Forked || e.Box != "b" || e.From != "a" || e.Took != time.Second || e.Seq != 3 {
		t.Fatalf("second event %+v", e)
	}
	if _, err := c.GC(ctx, 0.5); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Type != events.GC || e.Bytes != 4096 {
		t.Fatalf("after a gc: %+v, want a gc event freeing 4096 bytes", e)
	}
	srv.EndStreams()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the stream ended with %v when the daemon stopped", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the stream outlived the daemon's shutdown")
	}

	// A reader that falls behind is told, not silently left with a gap.
	lagging := serve(t, NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g, Events: x}))
	gate := make(chan struct{})
	first := make(chan struct{})
	err := make(chan error, 1)
	go func() {
		n := 0
		err <- lagging.Events(ctx, time.Time{}, func(events.Event) error {
			if n++; n == 1 {
				close(first)
				<-gate
			}
			return nil
		})
	}()
	// Until the stream is there (it subscribes once its request arrives).
	for waiting := true; waiting; {
		x.Publish(events.Event{Type: events.Paused, Box: "a"})
		select {
		case <-first:
			waiting = false
		case <-time.After(10 * time.Millisecond):
		}
	}
	// More than the socket's buffers and the listener's hold.
	for range 50 * events.ListenerBuffer {
		x.Publish(events.Event{Type: events.Paused, Box: "a"})
	}
	close(gate)
	select {
	case e := <-err:
		if !errors.Is(e, errdefs.ErrResourceExhausted) {
			t.Fatalf("a lagging stream ended with %v, want ErrResourceExhausted", e)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a lagging stream was not ended")
	}
}

func TestEventsRefuses(t *testing.T) {
	c := serve(t, newTestServer(newFakeManager(), &fakeGraph{}))
	err := c.Events(context.Background(), time.Time{}, func(events.Event) error { return nil })
	if !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("events of a daemon that keeps none: %v, want ErrNotImplemented", err)
	}
	srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: &fakeGraph{}, Events: events.New(0)})
	var body errorBody
	status := rawGet(t, srv, "/v1/events?since=yesterday", &body)
	if status != 400 || body.Category != "invalid_argument" {
		t.Fatalf("since=yesterday: %d %+v, want 400 invalid_argument", status, body)
	}
}

// rawGet answers GET path with srv's handler and decodes the JSON answer
// into out.
func rawGet(t *testing.T, srv *Server, path string, out any) int {
	t.Helper()
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if err := json.Unmarshal(rec.Body.Bytes(), out); err != nil {
		t.Fatalf("GET %s: %v in %q", path, err, rec.Body.String())
	}
	return rec.Code
}
