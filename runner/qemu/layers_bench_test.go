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

// phaseLog collects the phases (duration attributes) of each record
// runner/qemu logs with one message ("qemu: restore", "qemu: fork"), in
// order.
type phaseLog struct {
	msg     string
	mu      sync.Mutex
	records []map[string]time.Duration
}

func (p *phaseLog) Enabled(context.Context, slog.Level) bool { return true }
func (p *phaseLog) WithAttrs([]slog.Attr) slog.Handler       { return p }
func (p *phaseLog) WithGroup(string) slog.Handler            { return p }
func (p *phaseLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != p.msg {
		return nil
	}
	phases := map[string]time.Duration{}
	r.Attrs(func(a slog.Attr) bool {
		if a.Value.Kind() == slog.KindDuration {
			phases[a.Key] = a.Value.Duration()
		}
		return true
	})
	p.mu.Lock()
	p.records = append(p.records, phases)
	p.mu.Unlock()
	return nil
}

// phase is one phase of every record so far, 0 where a record lacks it.
func (p *phaseLog) phase(key string) []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]time.Duration, len(p.records))
	for i, r := range p.records {
		out[i] = r[key]
	}
	return out
}

// reset forgets the records so far.
func (p *phaseLog) reset() {
	p.mu.Lock()
	p.records = nil
	p.mu.Unlock()
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
	phases := &phaseLog{msg: "qemu: restore"}
	r.Logger = slog.New(phases)
	r.ResumeSpares = 1
	r.DiskLayers = layers
	qemu.SetFlatten(b, 0, 256<<20)
	b.Cleanup(r.StopResumeSpares)
	files := make([]int, cycles+1) // by cycle: the files in its restore's chain
	for range b.N {
		phases.reset()
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
	total, spare, devices := phases.phase("total"), phases.phase("spare"), phases.phase("devices")
	if len(total) != cycles {
		b.Fatalf("%d restores logged, want %d", len(total), cycles)
	}
	for _, c := range points {
		// Restore c is phases[c-1]; the medians take cycles c-1 to c+1.
		around := func(ds []time.Duration) float64 { return msMedian(ds[c-2 : c+1]) }
		b.ReportMetric(around(total), fmt.Sprintf("restore-ms@cycle-%d", c))
		b.ReportMetric(around(spare), fmt.Sprintf("spare-ms@cycle-%d", c))
		b.ReportMetric(around(devices), fmt.Sprintf("devices-ms@cycle-%d", c))
		b.ReportMetric(float64(files[c]), fmt.Sprintf("files@cycle-%d", c))
	}
}
