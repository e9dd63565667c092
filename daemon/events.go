package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/boxd-dev/boxd/events"
	"github.com/containerd/errdefs"
)

// eventLine is one line of GET /v1/events: an event, or, last, the error
// that ended the stream.
type eventLine struct {
	events.Event
	Error    string `json:"error,omitempty"`
	Category string `json:"category,omitempty"`
}

// ErrEventsLagged is the end of an event stream whose reader fell more
// than events.ListenerBuffer events behind.
var ErrEventsLagged = fmt.Errorf("the event stream fell more than %d events behind and was dropped: %w", events.ListenerBuffer, errdefs.ErrResourceExhausted)

// streamEvents answers GET /v1/events[?since=T]: the kept events since T
// (RFC 3339), then each new one as it happens, one JSON object a line,
// until the client goes or the daemon stops.
func (s *Server) streamEvents(w http.ResponseWriter, r *http.Request) {
	var since time.Time
	if v := r.URL.Query().Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			s.fail(w, r, fmt.Errorf("since %q: want an RFC 3339 time: %w", v, errdefs.ErrInvalidArgument))
			return
		}
		since = t
	}
	if s.events == nil {
		s.fail(w, r, fmt.Errorf("this daemon keeps no events: %w", errdefs.ErrNotImplemented))
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		s.fail(w, r, errors.New("events: the connection cannot stream"))
		return
	}
	sub := s.events.Subscribe(since)
	defer sub.Close()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	send := func(l eventLine) bool {
		if err := enc.Encode(l); err != nil {
			return false
		}
		if bw.Flush() != nil {
			return false
		}
		fl.Flush()
		return true
	}
	for _, e := range sub.Past {
		if !send(eventLine{Event: e}) {
			return
		}
	}
	fl.Flush() // the headers, when there is no past
	for {
		select {
		case e, ok := <-sub.C:
			if !ok {
				if sub.Lagged() {
					cat, _ := Category(ErrEventsLagged)
					send(eventLine{Error: ErrEventsLagged.Error(), Category: cat})
				}
				return
			}
			if !send(eventLine{Event: e}) {
				return
			}
		case <-r.Context().Done():
			return
		case <-s.streaming.Done():
			return
		}
	}
}

// EndStreams ends the event streams and follows of box logs in
// progress, and any begun later at once. The daemon calls it when it stops
// serving: the HTTP server's Shutdown waits for the requests in progress,
// and these do not end by themselves.
func (s *Server) EndStreams() { s.endStreaming() }

// Events calls fn with each event the daemon tells: those kept since
// since (none for a zero since), then each new one, until ctx ends (its
// error), the daemon stops (nil), fn fails (its error) or the stream
// breaks.
func (c *Client) Events(ctx context.Context, since time.Time, fn func(events.Event) error) error {
	path := "/v1/events"
	if !since.IsZero() {
		path += "?since=" + url.QueryEscape(since.UTC().Format(time.RFC3339Nano))
	}
	resp, err := c.open(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var l eventLine
		if err := dec.Decode(&l); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("boxd daemon at %s: the event stream broke: %w", c.socket, err)
		}
		if l.Error != "" {
			return remoteError(http.StatusOK, errorBody{Error: l.Error, Category: l.Category})
		}
		if err := fn(l.Event); err != nil {
			return err
		}
	}
}
