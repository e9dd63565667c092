package box_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

const (
	keyA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a"
	keyB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl b"
)

// counter starts a process that appends a growing number to /tmp/count
// five times a second, and waits (a while) for its first.
const counter = `setsid sh -c 'i=0; while :; do echo $i >> /tmp/count; i=$((i+1)); sleep 0.2; done' >/dev/null 2>&1 &
i=0; while [ ! -s /tmp/count ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done`

// run runs a shell line in box name and returns its stdout, failing t
// unless it exits 0.
func run(ctx context.Context, t *testing.T, mgr *box.Manager, name, line string) string {
	t.Helper()
	var out, errb bytes.Buffer
	code, err := mgr.Exec(ctx, name, agent.Command{Shell: line, Stdout: &out, Stderr: &errb})
	if err != nil || code != 0 {
		t.Fatalf("%s: %q: exit %d, %v: %s", name, line, code, err, errb.String())
	}
	return out.String()
}

// lastCount is the last number in box name's /tmp/count.
func lastCount(ctx context.Context, t *testing.T, mgr *box.Manager, name string) int {
	t.Helper()
	s := strings.TrimSpace(run(ctx, t, mgr, name, "tail -n 1 /tmp/count"))
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s: /tmp/count ends with %q", name, s)
	}
	return n
}

// countsOn checks that box name's counter goes on, from at least from.
func countsOn(ctx context.Context, t *testing.T, mgr *box.Manager, name string, from int) {
	t.Helper()
	first := lastCount(ctx, t, mgr, name)
	time.Sleep(time.Second)
	if then := lastCount(ctx, t, mgr, name); first < from || then <= first {
		t.Fatalf("%s: the counter went %d then %d; want from %d on, growing", name, first, then, from)
	}
}

// TestBoxes boots a box under QEMU and makes boxes from its snapshot, and
// checks that an idle hibernation loses no use that comes while it is
// decided.
func TestBoxes(t *testing.T) {
	mgr, _ := boxtest.NewManager(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}}); err != nil {
		t.Fatal(err)
	}
	run(ctx, t, mgr, "dev", "echo parent > /root/parent.txt; "+counter)
	devID := strings.TrimSpace(run(ctx, t, mgr, "dev", "cat /etc/machine-id"))

	t.Run("CreateFrom", func(t *testing.T) {
		sn, err := mgr.Snapshot(ctx, "dev", "s1")
		if err != nil {
			t.Fatal(err)
		}
		atSnapshot := lastCount(ctx, t, mgr, "dev")
		var entropy []string
		for _, name := range []string{"copy", "copy2"} {
			start := time.Now()
			bx, err := mgr.CreateFrom(ctx, box.FromOptions{Name: name, Snapshot: sn.Name, Keys: []string{keyB}})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s made from %s in %v", name, sn.Name, time.Since(start).Round(time.Millisecond))
			want := box.Box{
				Name: name, State: box.StateRunning, Image: boxtest.Image, Memory: 256 << 20, CPUs: 1,
				Keys: []string{keyB}, Snapshot: sn.Name, Parent: "dev",
			}
			if bx.Name != want.Name || bx.State != want.State || bx.Image != want.Image || bx.Memory != want.Memory ||
				bx.CPUs != want.CPUs || strings.Join(bx.Keys, ",") != keyB || bx.Snapshot != want.Snapshot || bx.Parent != want.Parent || bx.Note != "" {
				t.Errorf("box %+v, want %+v", bx, want)
			}
			if got, err := mgr.Get(name); err != nil || got.State != box.StateRunning || got.Parent != "dev" {
				t.Errorf("recorded as %+v, %v", got, err)
			}
			before := time.Now().Unix()
			lines := strings.Split(strings.TrimSpace(run(ctx, t, mgr, name,
				"hostname; cat /etc/machine-id; cat /root/parent.txt; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")), "\n")
			after := time.Now().Unix()
			if len(lines) != 5 {
				t.Fatalf("%s: %q", name, lines)
			}
			if lines[0] != name || lines[1] == devID || len(lines[1]) != 32 || lines[2] != "parent" {
				t.Errorf("%s: hostname %q, machine-id %q (the parent's %q), /root/parent.txt %q", name, lines[0], lines[1], devID, lines[2])
			}
			if clock, _ := strconv.ParseInt(lines[3], 10, 64); clock < before-1 || clock > after+1 {
				t.Errorf("%s: guest clock %s, host %d to %d", name, lines[3], before, after)
			}
			entropy = append(entropy, lines[4])
			countsOn(ctx, t, mgr, name, atSnapshot)
		}
		if entropy[0] == entropy[1] || len(entropy[0]) != 32 {
			t.Errorf("boxes from one snapshot read the same /dev/urandom: %q", entropy)
		}
		countsOn(ctx, t, mgr, "dev", atSnapshot)
		if _, err := mgr.Stop(ctx, "copy2"); err != nil {
			t.Fatal(err)
		}

		for _, tc := range []struct {
			name, snap string
			want       error
			says       string
		}{
			{"copy", sn.Name, errdefs.ErrAlreadyExists, `"copy"`},
			{"other", "box.dev.nope", errdefs.ErrNotFound, `no snapshot "box.dev.nope"`},
			{"other", guest.SnapshotName(boxtest.Image), errdefs.ErrInvalidArgument, "was not taken by a box"},
			{"other", "a/b", errdefs.ErrInvalidArgument, `"a/b"`},
			{"other", "", errdefs.ErrInvalidArgument, "no snapshot named"},
			{"Other", sn.Name, errdefs.ErrInvalidArgument, `box name "Other"`},
		} {
			_, err := mgr.CreateFrom(ctx, box.FromOptions{Name: tc.name, Snapshot: tc.snap})
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("%s from %q: %v; want %v saying %s", tc.name, tc.snap, err, tc.want, tc.says)
			}
		}
		if _, err := mgr.Get("other"); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("a refused box was recorded: %v", err)
		}
	})

	t.Run("HibernateIfIdle", func(t *testing.T) {
		before, err := mgr.Get("dev")
		if err != nil {
			t.Fatal(err)
		}
		// In use: left alone.
		if bx, ok, err := mgr.HibernateIfIdle(ctx, "dev", func() bool { return false }); ok || err != nil || bx.State != box.StateRunning {
			t.Fatalf("a box in use: %+v, %v, %v", bx, ok, err)
		}
		if bx, _ := mgr.Get("dev"); bx.State != box.StateRunning || bx.Snaps != before.Snaps {
			t.Fatalf("a box in use was touched: %+v", bx)
		}
		// Not running: left alone, without asking.
		asked := func() bool { t.Error("asked whether a stopped box is idle"); return true }
		if _, ok, err := mgr.HibernateIfIdle(ctx, "copy2", asked); ok || err != nil {
			t.Fatalf("a stopped box: %v, %v", ok, err)
		}
		if _, _, err := mgr.HibernateIfIdle(ctx, "nope", asked); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("an unknown box: %v", err)
		}

		// Idle, and a use comes while it is decided: the use waits for the
		// hibernation and resumes the box; it is not lost.
		atDecision := lastCount(ctx, t, mgr, "dev")
		type outcome struct {
			out  string
			code int
			err  error
		}
		used := make(chan outcome, 1)
		bx, ok, err := mgr.HibernateIfIdle(ctx, "dev", func() bool {
			go func() {
				var out bytes.Buffer
				code, err := mgr.Exec(ctx, "dev", agent.Command{Shell: "tail -n 1 /tmp/count", Stdout: &out})
				used <- outcome{out.String(), code, err}
			}()
			return true
		})
		if !ok || err != nil || bx.State != box.StateHibernated || !strings.HasSuffix(bx.Snapshot, "-hibernate") {
			t.Fatalf("an idle box: %+v, %v, %v", bx, ok, err)
		}
		u := <-used
		n, _ := strconv.Atoi(strings.TrimSpace(u.out))
		if u.err != nil || u.code != 0 || n < atDecision {
			t.Fatalf("the use that came during the hibernation: %+v (count %d at the decision)", u, atDecision)
		}
		if bx, _ := mgr.Get("dev"); bx.State != box.StateRunning {
			t.Errorf("after the use: %+v", bx)
		}
		countsOn(ctx, t, mgr, "dev", n)
	})

	// A fork this host's memory cannot hold (each machine costs
	// box.MachineOverhead at least) is refused before anything starts.
	t.Run("ForkBeyondHostMemory", func(t *testing.T) {
		total, err := procstat.MemTotal()
		if err != nil {
			t.Fatal(err)
		}
		n := int(total/box.MachineOverhead) + 1
		names := make([]string, n)
		for i := range names {
			names[i] = "many-" + strconv.Itoa(i)
		}
		before, _ := mgr.List()
		beforeDev, _ := mgr.Get("dev")
		_, err = mgr.Fork(ctx, "dev", names)
		if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), fmt.Sprintf("a fork of dev into %d boxes needs about", n)) {
			t.Fatalf("fork of dev into %d boxes: %v, want ErrResourceExhausted saying what it needs", n, err)
		}
		after, _ := mgr.List()
		afterDev, _ := mgr.Get("dev")
		if len(after) != len(before) || afterDev.Snapshot != beforeDev.Snapshot || afterDev.State != box.StateRunning {
			t.Fatalf("a refused fork changed things: %d boxes then %d; dev %+v then %+v", len(before), len(after), beforeDev, afterDev)
		}
		run(ctx, t, mgr, "dev", "true")
	})
}

// TestBoxOOMKilled: a box whose QEMU the kernel's OOM killer ends is marked
// stopped, saying so, and the next use boots it. The QEMU is put in a
// memory cgroup (v1) too small for what it touches next, so that the kernel
// kills it as it would on a host out of memory.
func TestBoxOOMKilled(t *testing.T) {
	const memcg = "/sys/fs/cgroup/memory"
	if _, err := os.Stat(filepath.Join(memcg, "cgroup.procs")); err != nil {
		t.Skipf("needs the cgroup v1 memory controller at %s: %v", memcg, err)
	}
	mgr, _ := boxtest.NewManager(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bx, err := mgr.Create(ctx, box.CreateOptions{Name: "hog", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}})
	if err != nil {
		t.Fatal(err)
	}
	pids, _ := exec.Command("pgrep", "-f", "file="+bx.Disk).Output()
	f := strings.Fields(string(pids))
	if len(f) != 1 {
		t.Fatalf("QEMU of box hog (disk %s): pids %q", bx.Disk, pids)
	}
	cg, err := os.MkdirTemp(memcg, "boxd-test-oom-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(cg) })
	if err := os.WriteFile(filepath.Join(cg, "memory.limit_in_bytes"), []byte(strconv.Itoa(24<<20)), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(f[0]), 0); err != nil {
		t.Fatalf("moving QEMU into %s: %v", cg, err)
	}
	// What the guest touches from now on is charged to the cgroup: 100 MB
	// of file pages in the guest's memory.
	go func() { _, _ = mgr.Exec(ctx, "hog", agent.Command{Shell: "head -c 100000000 /dev/zero > /root/fill"}) }()
	deadline := time.Now().Add(time.Minute)
	for {
		b, err := mgr.Get("hog")
		if err != nil {
			t.Fatal(err)
		}
		if b.State == box.StateStopped {
			if !strings.Contains(b.Note, "OOM killer") {
				t.Fatalf("a box the OOM killer ended: note %q, want it to say so", b.Note)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("box hog still %s a minute after its QEMU went into a 24 MiB memory cgroup", b.State)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := run(ctx, t, mgr, "hog", "echo back"); got != "back\n" {
		t.Fatalf("after a cold boot: %q", got)
	}
}

// TestBoxMemoryBound: a box's QEMU lives in a memory cgroup bounded to its
// guest's memory and the backends' headroom; a guest that touches all its
// memory, with little headroom, ends its QEMU, not the host, and the box
// says why and boots again on the next use.
func TestBoxMemoryBound(t *testing.T) {
	const headroom = 24 << 20
	mgr, _ := boxtest.NewManagerWith(t, func(c *backends.Config) { c.MemoryHeadroom = headroom })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bx, err := mgr.Create(ctx, box.CreateOptions{Name: "hog", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}})
	if err != nil {
		if strings.Contains(err.Error(), "OOM killer") {
			t.Fatalf("a box with %d MiB of headroom did not even boot: %v", headroom>>20, err)
		}
		t.Fatal(err)
	}
	pids, _ := exec.Command("pgrep", "-f", "file="+bx.Disk).Output()
	f := strings.Fields(string(pids))
	if len(f) != 1 {
		t.Fatalf("QEMU of box hog (disk %s): pids %q", bx.Disk, pids)
	}
	cg, err := os.ReadFile("/proc/" + f[0] + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cg), "/qemu-") {
		t.Fatalf("QEMU is in no machine cgroup of its own:\n%s", cg)
	}
	// A 200 MB buffer in the guest: guest memory QEMU had not touched yet.
	// (Past the bound the kernel first takes back the machine's page
	// cache, so a guest writing files alone may stay under it.)
	go func() {
		_, _ = mgr.Exec(ctx, "hog", agent.Command{Shell: "dd if=/dev/zero of=/dev/null bs=200M count=5 2>/dev/null"})
	}()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		b, err := mgr.Get("hog")
		if err != nil {
			t.Fatal(err)
		}
		if b.State == box.StateStopped {
			if !strings.Contains(b.Note, "memory cgroup was full") || !strings.Contains(b.Note, fmt.Sprintf("%d MiB of host memory", (256<<20+headroom)>>20)) {
				t.Fatalf("a box its bound ended: note %q, want it to say so", b.Note)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("box hog still %s two minutes after its guest began filling its memory", b.State)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := run(ctx, t, mgr, "hog", "echo back"); got != "back\n" {
		t.Fatalf("after a cold boot: %q", got)
	}
}

// TestBoxDiskBound: a box's disk is its image's size; writing past it
// fails inside the box, which runs on, and the disk's top on the host
// stays within that size (and qcow2's tables).
func TestBoxDiskBound(t *testing.T) {
	mgr, _ := boxtest.NewManager(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bx, err := mgr.Create(ctx, box.CreateOptions{Name: "filler", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}})
	if err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code, err := mgr.Exec(ctx, "filler", agent.Command{Shell: "dd if=/dev/urandom of=/root/fill bs=1M count=" + strconv.Itoa(2*boxtest.ImageSize>>20) + " && sync", Stdout: &out, Stderr: &errOut})
	if err != nil {
		t.Fatal(err)
	}
	if code == 0 || !strings.Contains(errOut.String(), "No space left on device") {
		t.Fatalf("writing twice the disk's size in the box: exit %d, %q; want no space left", code, errOut.String())
	}
	if got := run(ctx, t, mgr, "filler", "rm /root/fill; echo still here"); got != "still here\n" {
		t.Fatalf("after the disk filled: %q", got)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(bx.Disk, &st); err != nil {
		t.Fatal(err)
	}
	if used, bound := st.Blocks*512, int64(boxtest.ImageSize)+8<<20; used > bound {
		t.Fatalf("the disk's top takes %d MiB on the host, over the %d MiB image and 8 MiB for qcow2's tables", used>>20, boxtest.ImageSize>>20)
	}
}

// TestBoxCreateFailsLeavesNothing: a box whose guest never brings its
// agent up (here its /init is not an executable, so the kernel panics and
// QEMU exits) is not kept: no record, no disk, no memory file, no QEMU.
func TestBoxCreateFailsLeavesNothing(t *testing.T) {
	mgr, g := boxtest.NewManager(t)
	root := g.Root()
	notAgent := filepath.Join(t.TempDir(), "not-an-agent")
	testutil.WriteELF(t, notAgent) // a relocatable object: no init the kernel can run
	t.Setenv(guest.AgentEnv, notAgent)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, err := mgr.Create(ctx, box.CreateOptions{Name: "broken", Image: boxtest.Image, Memory: 128 << 20})
	if err == nil || !strings.Contains(err.Error(), "did not come up") {
		t.Fatalf("create of a box that cannot boot: %v, want it not to come up", err)
	}
	if boxes, _ := mgr.List(); len(boxes) != 0 {
		t.Fatalf("a box that never came up is listed: %+v", boxes)
	}
	if disks, _ := os.ReadDir(filepath.Join(root, "disks")); len(disks) != 0 {
		t.Fatalf("disk files left: %v", disks)
	}
	if procs, _ := exec.Command("pgrep", "-f", "qemu-system.*"+root).Output(); len(bytes.TrimSpace(procs)) != 0 {
		t.Fatalf("QEMU processes of the root left: %s", procs)
	}
	owners, _ := filepath.Glob("/dev/shm/boxd-*/owner")
	for _, o := range owners {
		b, _ := os.ReadFile(o)
		if f := strings.Fields(string(b)); len(f) == 2 && f[1] == root {
			left, _ := os.ReadDir(filepath.Dir(o))
			if len(left) != 1 {
				t.Fatalf("memory folder %s holds %d entries, want only its owner file", filepath.Dir(o), len(left))
			}
			return
		}
	}
	t.Fatalf("no memory folder names root %s", root)
}
