package qemu_test

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// fillInit fills most of the guest's memory with random data, then idles.
const fillInit = `#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mkdir -p /t
mount -t tmpfs -o size=150m tmpfs /t
dd if=/dev/urandom of=/t/fill bs=1M count=120 2>/dev/null
echo filled
while :; do sleep 1; done
`

// BenchmarkForkCopy forks a 192 MiB machine that filled 120 MiB of its
// memory, on its own memory file and on a frozen file (a fork of a fork),
// with the memory copied live (livecopy.go, Runner.LiveForks) and as files,
// side by side: ms a fork takes in all, ms the guest runs while its memory
// is copied, and ms it stands stopped. The live copies run even where
// QEMU's dirty tracking loses pages (QEMU before 9.0 under TCG): what it
// measures is the time, which that does not change.
func BenchmarkForkCopy(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	qemu.ForceLiveCopies(b)
	kernel, initrd := busyboxGuest(ctx, b, fillInit)
	spec := runner.Spec{
		MemSize: 192 << 20,
		Kernel:  kernel,
		Initrd:  initrd,
		Cmdline: "console=ttyS0 panic=-1 quiet",
		Network: runner.NetworkNone,
	}
	for _, mapping := range []string{"own", "frozen"} {
		for _, copyFiles := range []bool{true, false} {
			how := "live"
			if copyFiles {
				how = "files"
			}
			b.Run(mapping+"/"+how, func(b *testing.B) {
				phases := &phaseLog{msg: "qemu: fork"}
				g := testutil.OpenGraph(b, b.TempDir(), snapshotter.Open)
				r := &qemu.Runner{Dir: b.TempDir(), MemDir: shmDir(b), Graph: g, Logger: slog.New(phases), LiveForks: !copyFiles}
				m, err := r.StartMachine(ctx, spec)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { _ = m.Stop(context.Background()) })
				waitConsole(ctx, b, m, "filled")
				if mapping == "frozen" {
					if _, err := m.Freeze(ctx, "base", runner.SnapshotOptions{}); err != nil {
						b.Fatal(err)
					}
					if m, err = r.RestoreMachine(ctx, "base", runner.RestoreOptions{Console: filepath.Join(b.TempDir(), "console")}); err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { _ = m.Stop(context.Background()) })
				}
				b.ResetTimer()
				for i := range b.N {
					name := fmt.Sprintf("fork-%d", i)
					if _, err := m.SnapshotForFork(ctx, name, runner.SnapshotOptions{Incremental: true}); err != nil {
						b.Fatal(err)
					}
					// The snapshot's store write, outside the timing.
					b.StopTimer()
					if _, err := r.Committed(ctx, name); err != nil {
						b.Fatal(err)
					}
					r.ReleaseSnapshot(name)
					time.Sleep(500 * time.Millisecond)
					b.StartTimer()
				}
				b.StopTimer()
				// The guest ran while its memory was copied (precopy) and
				// stood stopped for the rest.
				running, total := phases.phase("precopy"), phases.phase("total")
				stopped := make([]time.Duration, len(total))
				for i := range total {
					stopped[i] = total[i] - running[i]
				}
				b.ReportMetric(msMedian(running), "running-ms/fork")
				b.ReportMetric(msMedian(stopped), "stopped-ms/fork")
				if live := qemu.LiveForks(m); (live > 0) == copyFiles {
					b.Fatalf("%d of %d forks copied live", live, b.N)
				}
			})
		}
	}
}

// msMedian is the median of ds in ms.
func msMedian(ds []time.Duration) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[len(s)/2]) / float64(time.Millisecond)
}

// waitConsole waits until m's console holds line.
func waitConsole(ctx context.Context, b *testing.B, m *qemu.Machine, line string) {
	b.Helper()
	for !regexp.MustCompile(`(?m)` + regexp.QuoteMeta(line) + `\r?$`).Match(m.Console()) {
		select {
		case <-ctx.Done():
			b.Fatalf("%s: no %q: %v; console:\n%s", m.ID(), line, ctx.Err(), m.Console())
		case <-m.Done():
			b.Fatalf("%s exited: %v; console:\n%s", m.ID(), m.Err(), m.Console())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
