package daemon

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
)

func TestCheckMetricsAddr(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		remote bool
		ok     bool
	}{
		{"127.0.0.1:9464", false, true},
		{"127.0.0.2:0", false, true},
		{"[::1]:9464", false, true},
		{"localhost:9464", false, true},
		{"0.0.0.0:9464", false, false},
		{":9464", false, false},
		{"[::]:9464", false, false},
		{"192.0.2.7:9464", false, false},
		{"metrics.example:9464", false, false},
		{"0.0.0.0:9464", true, true},
		{"9464", false, false},
		{"9464", true, false},
	} {
		err := CheckMetricsAddr(tc.addr, tc.remote)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, errdefs.ErrInvalidArgument)) {
			t.Errorf("CheckMetricsAddr(%q, %v) = %v, want ok %v", tc.addr, tc.remote, err, tc.ok)
		}
	}
}

// The metrics count events, fork latency once per fork, wake-ups, machine
// exits, gc and SSH outcomes, and read the boxes at each scrape.
func TestMetrics(t *testing.T) {
	x := events.New(0)
	m := newFakeManager(
		box.Box{Name: "dev", State: box.StateRunning},
		box.Box{Name: "nap", State: box.StateHibernated},
	)
	met := NewMetrics(m, &fakeGraph{}, x, nil)
	for _, e := range []events.Event{
		{Type: events.Created, Box: "dev", Took: 2 * time.Second},
		{Type: events.Forked, Box: "a", From: "dev", Snapshot: "box.dev.1-fork", Took: 300 * time.Millisecond},
		{Type: events.Forked, Box: "b", From: "dev", Snapshot: "box.dev.1-fork", Took: 300 * time.Millisecond},
		{Type: events.Forked, Box: "c", From: "dev", Snapshot: "box.dev.2-fork", Took: 200 * time.Millisecond},
		{Type: events.Resumed, Box: "nap", Reason: events.ReasonUsed, Took: time.Second},
		{Type: events.Resumed, Box: "nap", Reason: events.ReasonRequested, Took: time.Second},
		{Type: events.Stopped, Box: "a", Reason: "its machine exited: killed"},
		{Type: events.Stopped, Box: "b", Reason: events.ReasonRequested},
		{Type: events.GC, Bytes: 4096, Took: time.Millisecond},
	} {
		x.Publish(e)
	}
	for _, o := range []sshproxy.Outcome{sshproxy.Connected, sshproxy.Connected, sshproxy.Disconnected, sshproxy.Refused} {
		met.SSH(o)
	}
	rec := httptest.NewRecorder()
	met.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		`boxd_operation_duration_seconds_count{operation="fork"} 2`,
		`boxd_operation_duration_seconds_count{operation="create"} 1`,
		`boxd_operation_duration_seconds_count{operation="resume"} 2`,
		`boxd_operation_duration_seconds_count{operation="gc"} 1`,
		`boxd_events_total{type="forked"} 3`,
		`boxd_box_wakeups_total 1`,
		`boxd_box_machine_exits_total 1`,
		`boxd_gc_runs_total 1`,
		`boxd_gc_freed_bytes_total 4096`,
		`boxd_ssh_connections_total{outcome="connected"} 2`,
		`boxd_ssh_connections_total{outcome="refused"} 1`,
		`boxd_ssh_connections_open 1`,
		`boxd_boxes{state="running"} 1`,
		`boxd_boxes{state="hibernated"} 1`,
		`boxd_boxes{state="stopped"} 0`,
		`boxd_box_cpu_seconds_total{box="dev"} 1.5`,
		`boxd_store_snapshots 0`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if strings.Contains(body, `box="nap"`) {
		t.Error("a hibernated box has per-machine series")
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}
