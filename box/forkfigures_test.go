package box_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
)

// TestForkFigures measures forks of a 512 MiB box whose guest touched 256 MiB, with the parent going on in its
// machine (its memory copied) and moving to a new one (frozen, not copied), in one run, and logs the figures: the
// parent's first fork, into ten (the only one that moves the parent, which maps its frozen memory after), and the
// host memory the ten and their parent hold beyond the parent alone; ten forks into one after it (median, first,
// tenth); a fork of a fork. It checks nothing of speed: set BOXD_FORK_FIGURES=1 to run it.
func TestForkFigures(t *testing.T) {
	if os.Getenv("BOXD_FORK_FIGURES") == "" {
		t.Skip("figures, not a check: set BOXD_FORK_FIGURES=1 (minutes of 512 MiB boxes under QEMU)")
	}
	for _, moves := range []bool{false, true} {
		name := "parent stays"
		if moves {
			name = "parent moves"
		}
		t.Run(name, func(t *testing.T) { forkFigures(t, moves) })
	}
}

func forkFigures(t *testing.T, moves bool) {
	mgr, _ := boxtest.NewManagerBox(t, func(c *box.Config) { c.ForkMovesParent = moves })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	if _, err := mgr.Create(ctx, box.CreateOptions{Name: "fp", Image: boxtest.Image, Memory: 512 << 20, Keys: []string{keyA}}); err != nil {
		t.Fatal(err)
	}
	run(ctx, t, mgr, "fp", "mkdir -p /mnt/fill && mount -t tmpfs -o size=300M fill /mnt/fill && dd if=/dev/zero of=/mnt/fill/x bs=1M count=256 2>/dev/null")
	settle(t)
	alone := hostMemory(t)

	ten := make([]string, 10)
	for i := range ten {
		ten[i] = "ten-" + strconv.Itoa(i)
	}
	began := time.Now()
	if _, err := mgr.Fork(ctx, "fp", ten); err != nil {
		t.Fatal(err)
	}
	tenTook := time.Since(began)
	settle(t)
	withTen := hostMemory(t)
	t.Logf("first fork, into 10: %v; host memory: parent alone %d MiB, with 10 forks %d MiB (%d MiB more)",
		tenTook.Round(time.Millisecond), alone>>20, withTen>>20, (withTen-alone)>>20)
	for _, n := range ten {
		if err := mgr.Remove(ctx, n); err != nil {
			t.Fatal(err)
		}
	}

	var took []time.Duration
	for i := range 10 {
		settle(t)
		name := "one-" + strconv.Itoa(i)
		began := time.Now()
		if _, err := mgr.Fork(ctx, "fp", []string{name}); err != nil {
			t.Fatal(err)
		}
		took = append(took, time.Since(began))
		if err := mgr.Remove(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	sorted := slices.Clone(took)
	slices.Sort(sorted)
	t.Logf("10 forks into one: median %v, first %v, tenth %v (all: %v)", sorted[len(sorted)/2].Round(time.Millisecond),
		took[0].Round(time.Millisecond), took[9].Round(time.Millisecond), took)

	if _, err := mgr.Fork(ctx, "fp", []string{"ff"}); err != nil {
		t.Fatal(err)
	}
	settle(t)
	began = time.Now()
	if _, err := mgr.Fork(ctx, "ff", []string{"ff2"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("fork of a fork: %v", time.Since(began).Round(time.Millisecond))
}

// settle waits until this process's QEMUs have stayed the same for two seconds (spares started), at most a
// minute.
func settle(t *testing.T) {
	t.Helper()
	last, same := "", 0
	for end := time.Now().Add(time.Minute); time.Now().Before(end) && same < 4; time.Sleep(500 * time.Millisecond) {
		now := fmt.Sprint(qemuChildren(t))
		if now == last {
			same++
		} else {
			last, same = now, 0
		}
	}
}

// qemuChildren returns the pids of this process's QEMUs.
func qemuChildren(t *testing.T) []int {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 || !bytes.Contains(stat[:i], []byte("(qemu-system")) {
			continue
		}
		f := strings.Fields(string(stat[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(os.Getpid()) {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	return pids
}

// hostMemory is what this process's QEMUs hold of the host's memory: their proportional set sizes less the
// shared-memory part, plus the memory files on tmpfs they map, each counted once.
func hostMemory(t *testing.T) int64 {
	t.Helper()
	var total int64
	files := map[string]bool{}
	for _, pid := range qemuChildren(t) {
		rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
		if err != nil {
			continue
		}
		total += rollupKB(rollup, "Pss") - rollupKB(rollup, "Pss_Shmem")
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		for _, arg := range strings.Split(string(cmdline), "\x00") {
			for _, opt := range strings.Split(arg, ",") {
				if p, ok := strings.CutPrefix(opt, "mem-path="); ok {
					files[p] = true
				}
			}
		}
	}
	total <<= 10
	for f := range files {
		var st syscall.Stat_t
		if syscall.Stat(f, &st) == nil {
			total += st.Blocks * 512
		}
	}
	return total
}

// rollupKB is the value of key in a smaps_rollup text, in KiB.
func rollupKB(b []byte, key string) int64 {
	for line := range bytes.Lines(b) {
		if rest, ok := bytes.CutPrefix(line, []byte(key+":")); ok {
			f := strings.Fields(string(rest))
			if len(f) == 2 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return 0
}
