package qemu_test

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// restorePhases collects the phases runner/qemu logs for each restore
// ("qemu: restore"), in order.
type restorePhases struct {
	mu                    sync.Mutex
	spare, devices, total []time.Duration
}

func (p *restorePhases) Enabled(context.Context, slog.Level) bool { return true }
func (p *restorePhases) WithAttrs([]slog.Attr) slog.Handler       { return p }
func (p *restorePhases) WithGroup(string) slog.Handler            { return p }
func (p *restorePhases) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "qemu: restore" {
		return nil
	}
	var spare, devices, total time.Duration
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "spare":
			spare = a.Value.Duration()
		case "devices":
			devices = a.Value.Duration()
		case "total":
			total = a.Value.Duration()
		}
		return true
	})
	p.mu.Lock()
	p.spare = append(p.spare, spare)
	p.devices = append(p.devices, devices)
	p.total = append(p.total, total)
	p.mu.Unlock()
	return nil
}

// BenchmarkResumeLayers freezes and lazily resumes one machine (128 MiB,
// a qcow2 overlay over an image, as a box's disk is) 41 times, as a box
// that hibernates when idle and wakes on use does: every freeze leaves its
// disk's top as a layer under the next. It runs twice in one run: with the
// chain left to grow (Runner.DiskLayers negative, as boxd was before it
// bounded it), so that the chain QEMU opens grows by one file a cycle, and
// with the default bound, where a resumed machine past it streams its
// layers into its top (flatten.go; the benchmark waits for that, which a
// box idle for minutes before it hibernates would). For each it reports,
// as medians of three cycles around cycles 3, 10, 20 and 40, ms to the
// vCPUs running (restore-ms), of it the resume spare's take-over
// (spare-ms: the chain opened by drive_add) and the device state's load
// (devices-ms: QEMU activating the chain), and the files in the chain
// (files). Each restore takes a resume spare; the first, which finds none,
// is left out. About two minutes.
func BenchmarkResumeLayers(b *testing.B) {
	for _, tc := range []struct {
		name   string
		layers int
	}{{"growing", -1}, {"bounded", qemu.DefaultDiskLayers}} {
		b.Run(tc.name, func(b *testing.B) { resumeLayers(b, tc.layers) })
	}
}

func resumeLayers(b *testing.B, layers int) {
	const cycles = 41
	points := []int{3, 10, 20, 40}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	r, _, spec, work := diskMachine(ctx, b)
	phases := &restorePhases{}
	r.Logger = slog.New(phases)
	r.ResumeSpares = 1
	r.DiskLayers = layers
	qemu.SetFlatten(b, 0, 256<<20)
	b.Cleanup(r.StopResumeSpares)
	files := make([]int, cycles+1) // by cycle: the files in its restore's chain
	for range b.N {
		phases.mu.Lock()
		phases.spare, phases.devices, phases.total = nil, nil, nil
		phases.mu.Unlock()
		m, err := r.StartMachine(ctx, spec)
		if err != nil {
			b.Fatal(err)
		}
		for i := 1; i <= cycles; i++ {
			diskStep(ctx, b, m, lastStep(m.Console())) // it runs
			name := fmt.Sprintf("layers-%d-%d", b.N, i)
			if _, err := m.Freeze(ctx, name, runner.SnapshotOptions{}); err != nil {
				b.Fatal(err)
			}
			_ = m.Stop(ctx)
			r.ReleaseSnapshot(name)
			if _, err := r.Committed(ctx, name); err != nil {
				b.Fatal(err)
			}
			if i > 1 {
				for r.WaitingResumeSpares() == 0 {
					select {
					case <-ctx.Done():
						b.Fatal("no resume spare started")
					case <-time.After(5 * time.Millisecond):
					}
				}
			}
			disk := filepath.Join(work, fmt.Sprintf("%s.qcow2", name))
			if m, err = r.RestoreMachine(ctx, name, runner.RestoreOptions{Disk: disk, LongLived: true}); err != nil {
				b.Fatal(err)
			}
			if err := m.AwaitMemory(ctx); err != nil {
				b.Fatal(err)
			}
			files[i] = len(qemu.BackingChain(disk))
			// A chain past the bound is streamed.
			for layers >= 0 && len(qemu.BackingChain(disk))-1 > layers {
				select {
				case <-ctx.Done():
					b.Fatalf("the chain of %d files was not streamed", len(qemu.BackingChain(disk)))
				case <-time.After(10 * time.Millisecond):
				}
			}
		}
		_ = m.Stop(ctx)
	}
	if layers < 0 && files[cycles] != cycles+2 {
		b.Fatalf("the last restore's disk chain holds %d files, want %d", files[cycles], cycles+2)
	}
	phases.mu.Lock()
	defer phases.mu.Unlock()
	if len(phases.total) != cycles {
		b.Fatalf("%d restores logged, want %d", len(phases.total), cycles)
	}
	for _, c := range points {
		// Restore c is phases[c-1]; the medians take cycles c-1 to c+1.
		around := func(ds []time.Duration) float64 { return msMedian(ds[c-2 : c+1]) }
		b.ReportMetric(around(phases.total), fmt.Sprintf("restore-ms@cycle-%d", c))
		b.ReportMetric(around(phases.spare), fmt.Sprintf("spare-ms@cycle-%d", c))
		b.ReportMetric(around(phases.devices), fmt.Sprintf("devices-ms@cycle-%d", c))
		b.ReportMetric(float64(files[c]), fmt.Sprintf("files@cycle-%d", c))
	}
}
