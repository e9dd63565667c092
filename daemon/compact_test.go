package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// TestCompactRequest posts /v1/compact with and without options: the
// options reach the store's compaction, a request without a body gets the
// defaults, and bad options are refused with a 400 before any compaction.
func TestCompactRequest(t *testing.T) {
	for _, tc := range []struct {
		name       string
		body       string // "" sends no body
		wantStatus int
		wantOpts   *cas.CompactOptions // nil: Compact not called
		wantErr    string              // in the error answer
	}{
		{"no body", "", http.StatusOK, &cas.CompactOptions{}, ""},
		{"empty object", `{}`, http.StatusOK, &cas.CompactOptions{}, ""},
		{"frame chunks 1", `{"frame_chunks":1}`, http.StatusOK, &cas.CompactOptions{FrameChunks: 1}, ""},
		{"frame chunks 16", `{"frame_chunks":16}`, http.StatusOK, &cas.CompactOptions{FrameChunks: 16}, ""},
		{"frame chunks at the most", `{"frame_chunks":255}`, http.StatusOK, &cas.CompactOptions{FrameChunks: cas.MaxFrameChunks}, ""},
		{"frame chunks 0 is the default", `{"frame_chunks":0}`, http.StatusOK, &cas.CompactOptions{}, ""},
		{"negative frame chunks", `{"frame_chunks":-1}`, http.StatusBadRequest, nil, "frame_chunks -1 is outside 1-255"},
		{"frame chunks over the most", `{"frame_chunks":256}`, http.StatusBadRequest, nil, "frame_chunks 256 is outside 1-255"},
		{"absurd frame chunks", `{"frame_chunks":1000000000}`, http.StatusBadRequest, nil, "frame_chunks 1000000000 is outside 1-255"},
		{"frame chunks not a number", `{"frame_chunks":"many"}`, http.StatusBadRequest, nil, "request body"},
		{"unknown field", `{"frames":4}`, http.StatusBadRequest, nil, "unknown field"},
		{"broken JSON", `{"frame_chunks":`, http.StatusBadRequest, nil, "request body"},
		{"two values", `{} {}`, http.StatusBadRequest, nil, "more than one JSON value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeGraph{left: 1}
			srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g})
			req := httptest.NewRequest(http.MethodPost, "/v1/compact", nil)
			if tc.body != "" {
				req = httptest.NewRequest(http.MethodPost, "/v1/compact", strings.NewReader(tc.body))
				req.Header.Set("Content-Type", "application/json")
			}
			rec := httptest.NewRecorder()
			srv.Handler().ServeHTTP(rec, req)
			if rec.Code != tc.wantStatus {
				t.Fatalf("status %d (%s), want %d", rec.Code, rec.Body, tc.wantStatus)
			}
			if tc.wantOpts == nil {
				if g.compacts != 0 {
					t.Errorf("Compact called %d times with %+v; want none", g.compacts, g.compactOpts)
				}
				var eb errorBody
				if err := json.Unmarshal(rec.Body.Bytes(), &eb); err != nil || !strings.Contains(eb.Error, tc.wantErr) || eb.Category != "invalid_argument" {
					t.Errorf("error answer %s (%v), want category invalid_argument and %q", rec.Body, err, tc.wantErr)
				}
				return
			}
			if want := []cas.CompactOptions{*tc.wantOpts}; !reflect.DeepEqual(g.compactOpts, want) {
				t.Errorf("Compact called with %+v, want %+v", g.compactOpts, want)
			}
			var st cas.CompactStats
			if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil || st.PacksCompacted != 1 {
				t.Errorf("answer %s (%v), want one pack compacted", rec.Body, err)
			}
		})
	}
}

// TestCompactClient compacts through the client: its options reach the
// store's compaction, and bad ones come back as invalid arguments.
func TestCompactClient(t *testing.T) {
	for _, tc := range []struct {
		name    string
		req     CompactRequest
		wantErr error
	}{
		{"defaults", CompactRequest{}, nil},
		{"frame chunks 8", CompactRequest{FrameChunks: 8}, nil},
		{"negative frame chunks", CompactRequest{FrameChunks: -3}, errdefs.ErrInvalidArgument},
		{"too many frame chunks", CompactRequest{FrameChunks: cas.MaxFrameChunks + 1}, errdefs.ErrInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeGraph{left: 1}
			c := serve(t, NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g}))
			st, err := c.Compact(context.Background(), tc.req)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || g.compacts != 0 {
					t.Fatalf("Compact(%+v): %v after %d compactions; want %v and none", tc.req, err, g.compacts, tc.wantErr)
				}
				return
			}
			if err != nil || st.PacksCompacted != 1 {
				t.Fatalf("Compact(%+v): %+v, %v", tc.req, st, err)
			}
			if want := []cas.CompactOptions{{FrameChunks: tc.req.FrameChunks}}; !reflect.DeepEqual(g.compactOpts, want) {
				t.Errorf("Compact called with %+v, want %+v", g.compactOpts, want)
			}
		})
	}
}

func TestCompactIdle(t *testing.T) {
	for _, tc := range []struct {
		name      string
		sinceLast time.Duration // since the API's last request
		left      int           // packs to compact
		wantCalls int
		wantPacks int
	}{
		{"busy", time.Second, 3, 0, 0},
		{"quiet, nothing to do", time.Hour, 0, 1, 0},
		{"quiet, three packs", time.Hour, 3, 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := time.Unix(1_000_000, 0)
			g := &fakeGraph{left: tc.left}
			srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: g, Now: func() time.Time { return now }})
			// A request through the API marks the start of the spell.
			now = now.Add(-tc.sinceLast)
			srv.Handler().ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/v1/info", nil))
			now = now.Add(tc.sinceLast)
			st, err := srv.CompactIdle(context.Background(), time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			if g.compacts != tc.wantCalls || st.PacksCompacted != tc.wantPacks {
				t.Fatalf("%d Compact calls, %d packs; want %d, %d", g.compacts, st.PacksCompacted, tc.wantCalls, tc.wantPacks)
			}
		})
	}
}

// TestEvery: the loops' ticker calls its function again and again, and returns once its context ends.
func TestEvery(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls, done := make(chan struct{}, 100), make(chan struct{})
	go func() {
		every(ctx, time.Millisecond, func() { calls <- struct{}{} })
		close(done)
	}()
	for i := range 3 {
		select {
		case <-calls:
		case <-time.After(10 * time.Second):
			t.Fatalf("call %d did not come", i+1)
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("every did not return once its context ended")
	}
}
