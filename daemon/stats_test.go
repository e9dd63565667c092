package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Usage reports each box as it is, with a machine's figures while it runs
// or is paused, and store figures when asked.
func (m *fakeManager) Usage(_ context.Context, names []string, opts box.UsageOptions) ([]box.Usage, error) {
	if err := m.record("usage %s store=%v", strings.Join(names, ","), opts.Store); err != nil {
		return nil, err
	}
	var boxes []box.Box
	if len(names) == 0 {
		m.mu.Lock()
		for _, b := range m.boxes {
			boxes = append(boxes, b)
		}
		m.mu.Unlock()
		slices.SortFunc(boxes, func(a, b box.Box) int { return strings.Compare(a.Name, b.Name) })
	}
	for _, n := range names {
		b, err := m.lookup(n)
		if err != nil {
			return nil, err
		}
		boxes = append(boxes, b)
	}
	var out []box.Usage
	for _, b := range boxes {
		u := box.Usage{Name: b.Name, State: b.State, At: time.Now()}
		if b.State == box.StateRunning || b.State == box.StatePaused {
			cpu := 1.5
			u.Started, u.CPUSeconds = u.At.Add(-time.Minute), &cpu
		}
		if opts.Store {
			u.Store = &snapshotter.Exclusive{Chunks: 2, StoredBytes: 8000}
		}
		out = append(out, u)
	}
	return out, nil
}

func TestStats(t *testing.T) {
	m := newFakeManager(
		box.Box{Name: "dev", State: box.StateRunning},
		box.Box{Name: "nap", State: box.StatePaused},
		box.Box{Name: "old", State: box.StateStopped},
		box.Box{Name: "zzz", State: box.StateHibernated},
	)
	c := serve(t, newTestServer(m, &fakeGraph{}))
	ctx := context.Background()
	for _, tc := range []struct {
		opts  StatsOptions
		boxes []string
		call  string
	}{
		{StatsOptions{}, []string{"dev", "nap"}, "usage  store=false"},
		{StatsOptions{All: true}, []string{"dev", "nap", "old", "zzz"}, "usage  store=false"},
		{StatsOptions{Boxes: []string{"old", "dev"}}, []string{"old", "dev"}, "usage old,dev store=false"},
		{StatsOptions{Boxes: []string{"zzz"}, Store: true}, []string{"zzz"}, "usage zzz store=true"},
		{StatsOptions{Store: true}, []string{"dev", "nap"}, "usage  store=true"},
	} {
		t.Run(fmt.Sprintf("%+v", tc.opts), func(t *testing.T) {
			us, err := c.Stats(ctx, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, u := range us {
				got = append(got, u.Name)
				if (u.Store != nil) != tc.opts.Store {
					t.Errorf("%s: store figures %v, asked for: %v", u.Name, u.Store, tc.opts.Store)
				}
				if running := u.State == box.StateRunning || u.State == box.StatePaused; running != (u.CPUSeconds != nil) || running == u.Started.IsZero() {
					t.Errorf("%s (%s): CPU %v, started %v", u.Name, u.State, u.CPUSeconds, u.Started)
				}
			}
			if !slices.Equal(got, tc.boxes) {
				t.Errorf("boxes %v, want %v", got, tc.boxes)
			}
			m.mu.Lock()
			last := m.calls[len(m.calls)-1]
			m.mu.Unlock()
			if last != tc.call {
				t.Errorf("the manager's last call: %q, want %q", last, tc.call)
			}
		})
	}
	if _, err := c.Stats(ctx, StatsOptions{Boxes: []string{"dev", "nope"}}); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("stats of an unknown box: %v, want not found naming it", err)
	}

	// No box: an empty list, not null.
	empty := serve(t, newTestServer(newFakeManager(), &fakeGraph{}))
	resp, err := empty.hc.Get("http://boxd/v1/stats")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "[]" {
		t.Errorf("stats of no box: %d %s", resp.StatusCode, body)
	}
}

func TestStatsRefusesBadQueries(t *testing.T) {
	m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
	c := serve(t, newTestServer(m, &fakeGraph{}))
	for _, q := range []string{"box=Bad_Name", "box=", "store=yes", "all=2"} {
		resp, err := c.hc.Get("http://boxd/v1/stats?" + q)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "invalid_argument") {
			t.Errorf("GET /v1/stats?%s: %d %s, want 400 invalid_argument", q, resp.StatusCode, body)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.calls) != 0 {
		t.Errorf("the manager was asked: %v", m.calls)
	}
}
