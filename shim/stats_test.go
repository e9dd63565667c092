package shim

import (
	"errors"
	"math"
	"testing"

	"github.com/boxd-dev/boxd/box"
	cg2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
)

func TestStats(t *testing.T) {
	h := newHarness(t)
	if _, err := h.svc.Stats(h.ctx, &taskapi.StatsRequest{ID: testID}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Stats before Create: %v, want not found", err)
	}
	if err := h.create(h.streams("init", false), "sleep"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Start(h.ctx, &taskapi.StartRequest{ID: testID}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		state string // the box's, before Stats
	}{{"running", box.StateRunning}, {"paused", box.StatePaused}} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := h.boxes.state(h.svc.Box(), tc.state); err != nil {
				t.Fatal(err)
			}
			resp, err := h.svc.Stats(h.ctx, &taskapi.StatsRequest{ID: testID})
			if err != nil {
				t.Fatal(err)
			}
			v, err := typeurl.UnmarshalAny(resp.Stats)
			if err != nil {
				t.Fatal(err)
			}
			m, ok := v.(*cg2.Metrics)
			if !ok {
				t.Fatalf("metrics of type %T, want cgroup v2 metrics (containerd's CRI reads no other on Linux)", v)
			}
			if m.GetCPU().GetUsageUsec() != 1_500_000 || m.GetMemory().GetUsage() != fakePSS || m.GetMemory().GetUsageLimit() != math.MaxUint64 {
				t.Errorf("metrics %v: want 1.5 s of CPU, the PSS as usage, no limit", m)
			}
			if bx, _ := h.boxes.Get(h.ctx, h.svc.Box()); bx.State != tc.state {
				t.Errorf("box %s after Stats, want %s", bx.State, tc.state)
			}
		})
	}
	if _, err := h.boxes.state(h.svc.Box(), box.StateStopped); err != nil {
		t.Fatal(err)
	}
	if _, err := h.svc.Stats(h.ctx, &taskapi.StatsRequest{ID: testID}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Stats of a task whose box has no machine: %v, want not found", err)
	}
	if _, err := h.svc.Stats(h.ctx, &taskapi.StatsRequest{ID: "other"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Stats of another task: %v, want not found", err)
	}
}
