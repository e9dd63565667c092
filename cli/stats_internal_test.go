package cli

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
)

func TestCPUPercent(t *testing.T) {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	started := t0.Add(-time.Hour)
	at := func(d time.Duration, cpu float64) box.Usage {
		return box.Usage{At: t0.Add(d), Started: started, CPUSeconds: &cpu}
	}
	restarted := at(time.Second, 0.1)
	restarted.Started = t0.Add(500 * time.Millisecond)
	noCPU := at(time.Second, 0)
	noCPU.CPUSeconds = nil
	for _, tc := range []struct {
		name      string
		prev, cur box.Usage
		want      float64
		ok        bool
	}{
		{"idle", at(0, 12), at(time.Second, 12), 0, true},
		{"a quarter of a CPU", at(0, 12), at(time.Second, 12.25), 25, true},
		{"two CPUs busy", at(0, 12), at(2*time.Second, 16), 200, true},
		{"over half a second", at(0, 1), at(500*time.Millisecond, 1.1), 20, true},
		{"the machine started again", at(0, 12), restarted, 0, false},
		{"no CPU time now", at(0, 12), noCPU, 0, false},
		{"no CPU time before", noCPU, at(2*time.Second, 1), 0, false},
		{"the same moment", at(time.Second, 12), at(time.Second, 13), 0, false},
		{"out of order", at(2*time.Second, 12), at(time.Second, 13), 0, false},
		{"CPU time went back", at(0, 12), at(time.Second, 11), 0, false},
	} {
		got, ok := cpuPercent(tc.prev, tc.cur)
		if ok != tc.ok || math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("%s: %v, %v; want %v, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestUptime(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{1500 * time.Millisecond, "1s"},
		{59 * time.Second, "59s"},
		{time.Minute, "1m00s"},
		{5*time.Minute + 7*time.Second, "5m07s"},
		{3*time.Hour + 2*time.Minute + 59*time.Second, "3h02m"},
		{24 * time.Hour, "1d00h"},
		{50*time.Hour + 30*time.Minute, "2d02h"},
	} {
		if got := uptime(tc.d); got != tc.want {
			t.Errorf("uptime(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestStatsRowsAndTable(t *testing.T) {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	cpu := func(s float64) *float64 { return &s }
	started := t0.Add(-90 * time.Second)
	prev := []box.Usage{
		{Name: "dev", State: box.StateRunning, At: t0, Started: started, CPUSeconds: cpu(10)},
		{Name: "gone", State: box.StateRunning, At: t0, Started: started, CPUSeconds: cpu(1)},
	}
	cur := []box.Usage{
		{
			Name: "dev", State: box.StateRunning, At: t0.Add(time.Second), Started: started, CPUSeconds: cpu(10.5),
			HostMemory: &runner.MemoryUse{RSS: 300 << 20, PSS: 200 << 20},
			Disk:       &box.DiskUse{Allocated: 3 << 30},
			Store:      &snapshotter.Exclusive{StoredBytes: 1 << 20},
		},
		// New since the previous measurement: no CPU share yet.
		{Name: "new", State: box.StateRunning, At: t0.Add(time.Second), Started: t0.Add(time.Second / 2), CPUSeconds: cpu(0.1)},
		{Name: "off", State: box.StateStopped, At: t0.Add(time.Second), Disk: &box.DiskUse{Allocated: 4096}},
	}
	rows := statsRows(prev, cur)
	if len(rows) != 3 || rows[0].CPUPercent == nil || *rows[0].CPUPercent != 50 || rows[1].CPUPercent != nil || rows[2].CPUPercent != nil {
		t.Fatalf("rows: %+v", rows)
	}
	if rows[0].UptimeSeconds == nil || *rows[0].UptimeSeconds != 91 || rows[2].UptimeSeconds != nil {
		t.Fatalf("uptimes: %v, %v", rows[0].UptimeSeconds, rows[2].UptimeSeconds)
	}
	var b strings.Builder
	statsTable(&b, rows, true)
	want := "" +
		"NAME  STATE    CPU %   PSS         RSS         DISK      STORE     UPTIME\n" +
		"dev   running  50.00%  200.00 MiB  300.00 MiB  3.00 GiB  1.00 MiB  1m31s\n" +
		"new   running  -       -           -           -         -         0s\n" +
		"off   stopped  -       -           -           4.00 KiB  -         -\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
}
