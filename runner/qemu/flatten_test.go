package qemu_test

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// writeInit writes a numbered 4 KiB block to /dev/vda every 100 ms, 200 of
// them, keeps a copy of what it wrote in its own memory, and after each
// reads back every block it wrote from the device (the page cache
// dropped): "wrote N ok" when all of them read as written.
const writeInit = `#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/boxd/order); do insmod /lib/modules/boxd/$m; done
: > /tmp/expect
i=0
while :; do
	n=$i
	if [ $i -lt 200 ]; then
		echo "block $i" | dd of=/dev/vda bs=4096 seek=$((16+i)) conv=sync,notrunc 2>/dev/null
		echo "block $i" | dd bs=4096 conv=sync 2>/dev/null >> /tmp/expect
		sync
		n=$((i+1))
	fi
	echo 3 > /proc/sys/vm/drop_caches
	want=$(md5sum < /tmp/expect)
	got=$(dd if=/dev/vda bs=4096 skip=16 count=$n 2>/dev/null | md5sum)
	if [ "$want" = "$got" ]; then echo "wrote $i ok"; else echo "wrote $i bad"; fi
	i=$((i+1))
	sleep 0.1
done
`

var wroteRE = regexp.MustCompile(`(?m)^wrote (\d+) (ok|bad)\r?\n`)

// wrote waits for a line of writeInit numbered after after, fails the test
// if any line so far says bad, and returns the number.
func wrote(ctx context.Context, t *testing.T, m *qemu.Machine, after int) int {
	t.Helper()
	for {
		for _, s := range wroteRE.FindAllSubmatch(m.Console(), -1) {
			if string(s[2]) == "bad" {
				t.Fatalf("%s: %s: its disk lost what it wrote; console:\n%s", m.ID(), s[0], m.Console())
			}
			if n, _ := strconv.Atoi(string(s[1])); n > after {
				return n
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: no write after %d: %v; console:\n%s", m.ID(), after, ctx.Err(), m.Console())
		case <-m.Done():
			t.Fatalf("%s exited: %v; console:\n%s", m.ID(), m.Err(), m.Console())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestFlatten snapshots a machine that keeps writing its disk and checking
// what it wrote until its chain is past Runner.DiskLayers: a snapshot (by
// a runner that adopted the machine) cancels the stream job that then
// runs, the next job streams the layers but the lowest into the top, and
// the machine, its next snapshot and older snapshots all read every block
// as written.
func TestFlatten(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	r, _, spec, work := diskMachineWith(ctx, t, writeInit)
	r.DiskLayers = 2
	qemu.SetFlatten(t, 0, 1<<10) // a stream that outlasts the test
	m, err := r.StartMachine(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	step := wrote(ctx, t, m, -1)
	snapshot := func(name string) snapshotter.Snapshot {
		t.Helper()
		step = wrote(ctx, t, m, step)
		s, err := m.Snapshot(ctx, name, runner.SnapshotOptions{})
		if err != nil {
			t.Fatal(err)
		}
		step = wrote(ctx, t, m, step)
		return s
	}
	chain := func() []string { return qemu.BackingChain(m.Disk()) }
	lowest, image := spec.Disk.Path, filepath.Join(work, "disk.raw")

	// Two layers over the image after the first snapshot, three after the
	// second: a job starts, at 1 KiB/s.
	snapshot("flat-1")
	if n := len(chain()); n != 3 {
		t.Fatalf("the chain after a snapshot holds %d files, want the top, the frozen layer and the image", n)
	}
	snapshot("flat-2")
	for runs := false; !runs; {
		if runs, err = qemu.FlattenRuns(ctx, m); err != nil {
			t.Fatal(err)
		}
		if ctx.Err() != nil {
			t.Fatal("no stream job started")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A boxd that ends leaves the job running in QEMU: the next one adopts
	// the machine, and its next snapshot cancels the job; the job after
	// that runs at full speed.
	qemu.DropQMP(m)
	r = &qemu.Runner{Dir: r.Dir, MemDir: r.MemDir, Graph: r.Graph, Logger: r.Logger, DiskLayers: r.DiskLayers}
	adopted, err := r.Adopt(ctx, m.ID())
	if err != nil {
		t.Fatal(err)
	}
	m = adopted.(*qemu.Machine)
	qemu.SetFlatten(t, 0, 256<<20)
	if n := len(qemu.BackingChain(r.SnapshotDisk(snapshot("flat-3")))); n != 4 {
		t.Fatalf("the third snapshot's disk chain holds %d files, want its three layers and the image", n)
	}
	for len(chain()) != 3 {
		if ctx.Err() != nil {
			t.Fatalf("the chain still holds %d files", len(chain()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if c := chain(); c[1] != lowest || c[2] != image {
		t.Fatalf("the chain after the stream: %v, want the top over the lowest layer over the image", c)
	}
	step = wrote(ctx, t, m, step+5)

	// A snapshot now freezes a top that holds every layer's data but the
	// lowest's, and those from before the stream still have their layers.
	if n := len(qemu.BackingChain(r.SnapshotDisk(snapshot("flat-4")))); n != 3 {
		t.Fatalf("the disk chain of a snapshot after the stream holds %d files, want the frozen top, the lowest layer and the image", n)
	}
	_ = m.Stop(ctx)
	// Restored, they read what they wrote. A fork's child (unique) is
	// allowed a layer more than the bound; a resumed box is not. (The
	// guest has no agent to reseed.)
	r.Unique = func(context.Context, *qemu.Machine) error { return nil }
	for _, tc := range []struct {
		snap   string
		unique bool
		files  int // in the chain once it settles
	}{
		{"flat-4", true, 4},
		{"flat-3", false, 3},
		{"flat-1", false, 3},
	} {
		disk := filepath.Join(work, fmt.Sprintf("restored-%s.qcow2", tc.snap))
		rm, err := r.RestoreMachine(ctx, tc.snap, runner.RestoreOptions{Disk: disk, Unique: tc.unique})
		if err != nil {
			t.Fatal(err)
		}
		wrote(ctx, t, rm, wrote(ctx, t, rm, -1))
		for len(qemu.BackingChain(disk)) > tc.files && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		// Two more rounds of writes and reads: time for a stream to start
		// and end where none should.
		wrote(ctx, t, rm, lastNumbered(wroteRE, rm.Console())+1)
		if n := len(qemu.BackingChain(disk)); n != tc.files {
			t.Errorf("%s restored (unique %v): its chain holds %d files, want %d", tc.snap, tc.unique, n, tc.files)
		}
		_ = rm.Stop(ctx)
	}
}
