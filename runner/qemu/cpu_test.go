package qemu_test

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// cpuInit reports, as the first thing the guest runs, whether its CPU has
// RDRAND and whether the kernel's random pool is ready already.
const cpuInit = `#!/bin/sh
mount -t proc proc /proc
r=no; grep -q -w rdrand /proc/cpuinfo && r=yes
c=no; dmesg | grep -q "crng init done" && c=yes
echo "guest cpu: rdrand=$r crng=$c"
while :; do sleep 1; done
`

var cpuLineRE = regexp.MustCompile(`guest cpu: rdrand=(yes|no) crng=(yes|no)`)

// A new machine's guest has RDRAND and so a random pool ready before its
// first process runs (nothing in a box waits for entropy); a machine of
// LegacyCPU, as snapshots from before restore on, has not.
func TestCPUModel(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Linux guest under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	kernel, initrd := busyboxGuest(ctx, t, cpuInit)
	r := &qemu.Runner{Dir: t.TempDir(), MemDir: t.TempDir()}
	for _, tc := range []struct {
		model        string
		rdrand, crng string // "" not checked
	}{
		{"", "yes", "yes"},
		{qemu.LegacyCPU, "no", ""},
	} {
		m, err := r.StartMachine(ctx, runner.Spec{MemSize: 128 << 20, Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1 quiet", CPUModel: tc.model})
		if err != nil {
			t.Fatalf("model %q: Start: %v", tc.model, err)
		}
		var got []string
		for {
			if sm := cpuLineRE.FindStringSubmatch(string(m.Console())); sm != nil {
				got = sm[1:]
				break
			}
			select {
			case <-ctx.Done():
				t.Fatalf("model %q: no report on the console: %v; console:\n%s", tc.model, ctx.Err(), m.Console())
			case <-m.Done():
				t.Fatalf("model %q: machine exited: %v; console:\n%s", tc.model, m.Err(), m.Console())
			case <-time.After(50 * time.Millisecond):
			}
		}
		t.Logf("model %q: rdrand=%s, random pool ready at the first process: %s", tc.model, got[0], got[1])
		if got[0] != tc.rdrand || (tc.crng != "" && got[1] != tc.crng) {
			t.Errorf("model %q: guest reports rdrand=%s crng=%s, want rdrand=%s crng=%s", tc.model, got[0], got[1], tc.rdrand, tc.crng)
		}
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = m.Stop(sctx)
		scancel()
	}
}
