package qemu_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/containerd/errdefs"
)

const busyboxPath = testutil.BusyboxPath

// tickInit mounts /proc and prints a growing counter to the console forever.
const tickInit = "#!/bin/sh\nmount -t proc proc /proc\ni=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done\n"

var tickRE = regexp.MustCompile(`(?m)^tick (\d+)\r?\n`)

// lastTick is the highest tick on the console, -1 if none.
func lastTick(console []byte) int {
	last := -1
	for _, m := range tickRE.FindAllSubmatch(console, -1) {
		if n, err := strconv.Atoi(string(m[1])); err == nil && n > last {
			last = n
		}
	}
	return last
}

func TestStartPauseResumeStop(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Linux guest under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	kernel, initrd := guest(ctx, t)

	r := &qemu.Runner{Dir: t.TempDir(), MemDir: t.TempDir(), OOMScoreAdj: 300}
	t.Logf("accelerator: %s", r.Accel())
	spec := runner.Spec{
		MemSize: 256 << 20,
		Kernel:  kernel,
		Initrd:  initrd,
		Cmdline: "console=ttyS0 panic=-1 quiet",
	}
	m, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { // Stop kills QEMU if it does not quit within the second
		sctx, scancel := context.WithTimeout(context.Background(), time.Second)
		defer scancel()
		_ = m.Stop(sctx)
	})
	t.Logf("machine %s (QEMU pid %d)", m.ID(), m.PID())

	// The kernel's OOM killer picks a machine before boxd (Runner.OOMScoreAdj).
	if adj, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", m.PID())); err != nil || strings.TrimSpace(string(adj)) != "300" {
		t.Fatalf("QEMU's oom_score_adj: %q, %v; want 300", adj, err)
	}
	if fi, err := os.Stat(m.MemoryFile()); err != nil || fi.Size() != spec.MemSize {
		t.Fatalf("memory file %s: %v, want %d bytes", m.MemoryFile(), err, spec.MemSize)
	}
	first := waitTick(ctx, t, m, 0)
	t.Logf("console shows tick %d", first)

	if err := m.Pause(ctx); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	if err := m.Pause(ctx); err != nil {
		t.Fatalf("Pause of a paused machine: %v", err)
	}
	if st, err := m.Status(ctx); err != nil || st != "paused" {
		t.Fatalf("after Pause, query-status = %q, %v; want paused", st, err)
	}
	paused := lastTick(m.Console())

	if err := m.Continue(ctx); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	if st, err := m.Status(ctx); err != nil || st != "running" {
		t.Fatalf("after Resume, query-status = %q, %v; want running", st, err)
	}
	after := waitTick(ctx, t, m, paused+1)
	t.Logf("paused at tick %d, resumed to tick %d", paused, after)

	if err := m.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed after Stop returned")
	}
	if !errors.Is(m.Err(), runner.ErrStopped) {
		t.Fatalf("Err after Stop = %v, want ErrStopped", m.Err())
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	if lastTick(m.Console()) < after {
		t.Fatalf("console after Stop lost ticks: last %d, want >= %d", lastTick(m.Console()), after)
	}
	if err := m.Pause(ctx); !errors.Is(err, runner.ErrStopped) {
		t.Fatalf("Pause of a stopped machine = %v, want ErrStopped", err)
	}
	if _, err := m.Snapshot(ctx, "s", runner.SnapshotOptions{}); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("Snapshot = %v, want errdefs.ErrNotImplemented", err)
	}
	for _, dir := range []string{r.Dir, r.MemDir} {
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Fatalf("files left behind in %s after Stop: %v", dir, entries)
		}
	}
}

// waitTick polls the console until it shows a tick of at least want.
func waitTick(ctx context.Context, t *testing.T, m *qemu.Machine, want int) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		if n := lastTick(m.Console()); n >= want {
			return n
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no tick >= %d on the console: %v; console:\n%s", want, ctx.Err(), m.Console())
		case <-m.Done():
			t.Fatalf("machine exited waiting for tick %d: %v; console:\n%s", want, m.Err(), m.Console())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Without a store there is nothing to restore from.
func TestRestoreNeedsGraph(t *testing.T) {
	r := &qemu.Runner{}
	_, err := r.Restore(context.Background(), "any", runner.RestoreOptions{})
	if !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("Restore = %v, want errdefs.ErrNotImplemented", err)
	}
	t.Log(err)
	if c := r.Capabilities(); !c.Linux || c.LazyMemory || !c.IncrementalSnapshots {
		t.Fatalf("Capabilities = %+v", c)
	}
	if r.Name() != "qemu" {
		t.Fatalf("Name = %q", r.Name())
	}
}

func TestStartRejectsBadSpec(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("not a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	r := &qemu.Runner{Dir: t.TempDir(), Binary: "/nonexistent/qemu"} // nothing may get as far as running QEMU
	for _, c := range []struct {
		name string
		spec runner.Spec
		want error
	}{
		{"zero memory", runner.Spec{Kernel: kernel}, errdefs.ErrInvalidArgument},
		{"odd memory", runner.Spec{MemSize: 1<<20 + 1, Kernel: kernel}, errdefs.ErrInvalidArgument},
		{"negative CPUs", runner.Spec{MemSize: 64 << 20, CPUs: -1, Kernel: kernel}, errdefs.ErrInvalidArgument},
		{"no kernel", runner.Spec{MemSize: 64 << 20}, errdefs.ErrInvalidArgument},
		{"missing kernel", runner.Spec{MemSize: 64 << 20, Kernel: missing}, errdefs.ErrNotFound},
		{"missing initrd", runner.Spec{MemSize: 64 << 20, Kernel: kernel, Initrd: missing}, errdefs.ErrNotFound},
		{"missing disk", runner.Spec{MemSize: 64 << 20, Kernel: kernel, Disk: &runner.Disk{Path: missing}}, errdefs.ErrNotFound},
		{"unknown network", runner.Spec{MemSize: 64 << 20, Kernel: kernel, Network: "bridge"}, errdefs.ErrInvalidArgument},
		{"no QEMU", runner.Spec{MemSize: 64 << 20, Kernel: kernel}, errdefs.ErrNotImplemented},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, err := r.Start(context.Background(), c.spec)
			if m != nil {
				_ = m.Stop(context.Background())
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("Start = %v, want %v", err, c.want)
			}
			t.Log(err)
		})
	}
	if c := "missing kernel"; !errors.Is(mustErr(r.Start(context.Background(), runner.Spec{MemSize: 64 << 20, Kernel: missing})), os.ErrNotExist) {
		t.Fatalf("%s: error does not wrap os.ErrNotExist", c)
	}
}

func mustErr(_ runner.Machine, err error) error { return err }

// guest fetches the kernel and writes the ticking initramfs; it returns their paths.
func guest(ctx context.Context, t *testing.T) (kernel, initrd string) {
	t.Helper()
	return busyboxGuest(ctx, t, tickInit)
}
