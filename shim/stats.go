package shim

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	cg2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
)

// Stats reports what the container's box uses of the host, as the cgroup
// v2 metrics containerd's CRI reads (crictl stats, the kubelet): the CPU
// time its machine has used since it started, and the host memory the
// machine holds, as its proportional set size (memory it shares with
// other boxes, such as a snapshot's frozen pages, counts in part). The
// containers of a pod share the pod's box, and each reports the box's
// figures. Asking does not reach the box's agent, so it leaves a paused
// box paused. A box with no machine has no figures: not found.
func (s *Service) Stats(ctx context.Context, r *taskapi.StatsRequest) (*taskapi.StatsResponse, error) {
	s.mu.Lock()
	_, err := s.process(r.ID, "")
	name := s.box
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	us, err := s.boxes.Stats(ctx, daemon.StatsOptions{Boxes: []string{name}})
	if err != nil {
		return nil, fmt.Errorf("stats of box %s: %w", name, err)
	}
	if len(us) != 1 {
		return nil, fmt.Errorf("stats of box %s: the daemon answered for %d boxes: %w", name, len(us), errdefs.ErrNotFound)
	}
	m, ok := usageMetrics(us[0])
	if !ok {
		return nil, fmt.Errorf("stats of box %s: it has no machine (%s): %w", name, us[0].State, errdefs.ErrNotFound)
	}
	data, err := typeurl.MarshalAnyToProto(m)
	if err != nil {
		return nil, fmt.Errorf("stats of box %s: %w", name, err)
	}
	return &taskapi.StatsResponse{Stats: data}, nil
}

// usageMetrics turns a box's usage into cgroup v2 metrics; ok is false
// when the usage has no figure of a machine.
func usageMetrics(u box.Usage) (m *cg2.Metrics, ok bool) {
	if u.CPUSeconds == nil && u.HostMemory == nil {
		return nil, false
	}
	m = &cg2.Metrics{}
	if u.CPUSeconds != nil {
		m.CPU = &cg2.CPUStat{UsageUsec: uint64(*u.CPUSeconds * float64(time.Second/time.Microsecond))}
	}
	if u.HostMemory != nil {
		// No limit is reported: the box's guest memory bounds what its guest
		// uses, not what its machine holds on the host.
		m.Memory = &cg2.MemoryStat{Usage: uint64(max(u.HostMemory.PSS, 0)), UsageLimit: math.MaxUint64}
	}
	return m, true
}
