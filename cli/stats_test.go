package cli_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/creack/pty"
)

// boxStats is an element of boxd stats --json.
type boxStats struct {
	Name          string    `json:"name"`
	State         string    `json:"state"`
	At            time.Time `json:"at"`
	Started       time.Time `json:"started"`
	CPUs          int       `json:"cpus"`
	GuestMemory   int64     `json:"guest_memory"`
	CPUSeconds    *float64  `json:"cpu_seconds"`
	CPUPercent    *float64  `json:"cpu_percent"`
	UptimeSeconds *float64  `json:"uptime_seconds"`
	HostMemory    *struct {
		RSS int64 `json:"rss"`
		PSS int64 `json:"pss"`
	} `json:"host_memory"`
	Disk *struct {
		Path      string `json:"path"`
		Allocated int64  `json:"allocated"`
		Size      int64  `json:"size"`
	} `json:"disk"`
	Store *struct {
		Chunks      int64 `json:"chunks"`
		StoredBytes int64 `json:"stored_bytes"`
	} `json:"store"`
}

// stats runs boxd stats --no-stream --json with args and returns what it
// printed, checking that each element has exactly the fields it should:
// the machine's while the box has one, store figures only with --store.
func stats(t *testing.T, root string, args ...string) []boxStats {
	t.Helper()
	out := ok(t, root, append([]string{"stats", "--no-stream", "--json"}, args...)...).stdout
	var raw []map[string]any
	decodeJSON(t, out, &raw)
	if raw == nil {
		t.Fatalf("stats --json: %q is not an array", out)
	}
	var got []boxStats
	decodeJSON(t, out, &got)
	withStore := strings.Contains(strings.Join(args, " "), "--store")
	for i, obj := range raw {
		want := []string{"name", "state", "runner", "at", "cpus", "guest_memory", "disk"}
		if st := got[i].State; st == "running" || st == "paused" {
			want = append(want, "started", "cpu_seconds", "host_memory", "uptime_seconds", "cpu_percent")
		}
		if withStore {
			want = append(want, "store")
		}
		var have []string
		for k := range obj {
			have = append(have, k)
		}
		sort.Strings(want)
		sort.Strings(have)
		if strings.Join(have, " ") != strings.Join(want, " ") {
			t.Errorf("stats --json %v: %s has fields %v, want %v", args, got[i].Name, have, want)
		}
	}
	return got
}

// qemuPID is the QEMU running with disk, found as the tests that kill
// QEMU find it.
func qemuPID(t *testing.T, disk string) int {
	t.Helper()
	out, _ := exec.Command("pgrep", "-f", "file="+disk).Output()
	f := strings.Fields(string(out))
	if len(f) != 1 {
		t.Fatalf("QEMU with disk %s: pids %q", disk, out)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// procCPU is the CPU seconds (utime + stime) process pid has used, read
// from /proc/PID/stat.
func procCPU(t *testing.T, pid int) float64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields 14 and 15, counted from 1, in clock ticks of 1/100 s; the
	// command (field 2) is in parentheses and may hold spaces.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		t.Fatalf("/proc/%d/stat: %q", pid, b)
	}
	return float64(utime+stime) / 100
}

// procPSS is process pid's Pss in /proc/PID/smaps_rollup, in bytes.
func procPSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "Pss:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no Pss in /proc/%d/smaps_rollup:\n%s", pid, b)
	return 0
}

// allocated is the bytes file path takes on the host's disk.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// within checks that got is within 10% of the range [lo, hi] that the
// host's own figures, read just before and just after, span.
func within(t *testing.T, what string, got, lo, hi float64) {
	t.Helper()
	lo, hi = min(lo, hi), max(lo, hi)
	if got < 0.9*lo || got > 1.1*hi {
		t.Errorf("%s: boxd says %.3f, the host %.3f to %.3f", what, got, lo, hi)
	}
}

// TestStatsQEMU checks boxd stats against what Linux says of a real box's
// QEMU: its CPU time and PSS, and its disk file's allocated bytes; then
// the CPU share of a busy box, streamed as JSON lines, the store figures
// of its snapshot, the table on a terminal, and a stopped box.
func TestStatsQEMU(t *testing.T) {
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d := startDaemon(t, root)
	t.Cleanup(func() {
		run(t, root, "rm", "dev")
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	created := time.Now()
	ok(t, root, "create", "dev", "--image", boxtest.Image, "--memory", "256M", "--runner", "qemu", "--ssh-key", writeKey(t))
	// Something on the disk and in memory.
	ok(t, root, "exec", "dev", "--", "sh", "-c", "dd if=/dev/urandom of=/root/f bs=1M count=8 2>/dev/null; sync")

	first := stats(t, root, "dev")
	if len(first) != 1 || first[0].Disk == nil {
		t.Fatalf("stats dev: %+v", first)
	}
	disk := first[0].Disk.Path
	pid := qemuPID(t, disk)

	cpu0, pss0, disk0 := procCPU(t, pid), procPSS(t, pid), allocated(t, disk)
	start := time.Now()
	got := stats(t, root, "dev")
	took := time.Since(start)
	cpu1, pss1, disk1 := procCPU(t, pid), procPSS(t, pid), allocated(t, disk)
	t.Logf("stats --no-stream took %v; QEMU %d: %.2f-%.2f CPU s, PSS %d-%d, disk %d-%d", took, pid, cpu0, cpu1, pss0, pss1, disk0, disk1)
	if len(got) != 1 {
		t.Fatalf("stats dev: %+v", got)
	}
	s := got[0]
	if s.Name != "dev" || s.State != "running" || s.CPUs != 1 || s.GuestMemory != 256<<20 || s.Disk.Path != disk {
		t.Errorf("stats dev: %+v", s)
	}
	within(t, "CPU seconds", *s.CPUSeconds, cpu0, cpu1)
	within(t, "PSS", float64(s.HostMemory.PSS), float64(pss0), float64(pss1))
	within(t, "disk allocated", float64(s.Disk.Allocated), float64(disk0), float64(disk1))
	if s.Disk.Allocated < 8<<20 {
		t.Errorf("the disk holds 8 MiB written by the guest, yet %d bytes are allocated", s.Disk.Allocated)
	}
	if s.HostMemory.PSS > s.HostMemory.RSS || s.HostMemory.RSS <= 0 {
		t.Errorf("host memory: %+v", *s.HostMemory)
	}
	if s.Started.Before(created) || s.Started.After(s.At) || math.Abs(*s.UptimeSeconds-s.At.Sub(s.Started).Seconds()) > 1e-3 {
		t.Errorf("started %v, at %v, uptime %v s; the box was created at %v", s.Started, s.At, *s.UptimeSeconds, created)
	}
	if took < time.Second {
		t.Errorf("--no-stream took %v: the CPU share needs two measurements a second apart", took)
	}

	t.Run("busy box, streamed", func(t *testing.T) {
		// A guest busy for a while: its QEMU uses about one host CPU.
		ok(t, root, "exec", "dev", "--", "sh", "-c", `(end=$(( $(date +%s) + 30 )); while [ $(date +%s) -lt $end ]; do :; done) </dev/null >/dev/null 2>&1 &`)
		cmd := command(root, "stats", "dev", "--json")
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := bufio.NewScanner(out)
		prevCPU, prevAt := procCPU(t, pid), time.Now()
		busiest := 0.0
		for i := range 4 {
			if !lines.Scan() {
				t.Fatalf("the stream ended after %d lines: %v; stderr %q", i, lines.Err(), stderr.String())
			}
			cpu, at := procCPU(t, pid), time.Now()
			var rows []boxStats
			if err := json.Unmarshal(lines.Bytes(), &rows); err != nil || len(rows) != 1 || rows[0].CPUPercent == nil {
				t.Fatalf("line %d: %q: %v", i, lines.Text(), err)
			}
			host := 100 * (cpu - prevCPU) / at.Sub(prevAt).Seconds()
			t.Logf("line %d: CPU %.1f%%; the host saw %.1f%% since the line before", i, *rows[0].CPUPercent, host)
			// The first line's share covers the second before it, which
			// began as boxd started; the others, the span between lines.
			if i > 0 && math.Abs(*rows[0].CPUPercent-host) > 15 {
				t.Errorf("line %d: CPU %.1f%%, the host saw %.1f%%", i, *rows[0].CPUPercent, host)
			}
			// How much of a CPU the spinning guest gets depends on what
			// else the host runs: only that it shows is checked.
			busiest = max(busiest, *rows[0].CPUPercent)
			prevCPU, prevAt = cpu, at
		}
		if busiest < 10 {
			t.Errorf("a busy box never showed over %.1f%% CPU", busiest)
		}
		// ^C ends the stream, as a shell reports it.
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 130 || stderr.Len() != 0 {
			t.Errorf("stats after ^C: exit %d, stderr %q; want 130 and nothing said", code, stderr.String())
		}
	})

	t.Run("store", func(t *testing.T) {
		ok(t, root, "snapshot", "dev", "--name", "s1")
		// What one measurement costs the daemon: the store figures once
		// measured, then kept; without them.
		c := daemon.NewClient(root)
		for _, what := range []string{"store figures measured", "store figures kept", "without the store figures"} {
			opts := daemon.StatsOptions{Boxes: []string{"dev"}, Store: what != "without the store figures"}
			n := 1
			if what == "without the store figures" {
				n = 20
			}
			start := time.Now()
			for range n {
				if _, err := c.Stats(context.Background(), opts); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("GET /v1/stats, %s: %v", what, time.Since(start)/time.Duration(n))
		}
		got := stats(t, root, "dev", "--store")
		var rep struct {
			Boxes []struct {
				Box    string `json:"box"`
				Report struct {
					PerSnapshot []struct {
						Name           string `json:"name"`
						ExclusiveBytes int64  `json:"exclusive_bytes"`
					} `json:"per_snapshot"`
				} `json:"report"`
			} `json:"boxes"`
		}
		decodeJSON(t, ok(t, root, "report", "dev", "--json").stdout, &rep)
		// One box with one snapshot: the chunks only it references are the
		// snapshot's alone.
		if len(rep.Boxes) != 1 || len(rep.Boxes[0].Report.PerSnapshot) != 1 {
			t.Fatalf("report dev: %+v", rep)
		}
		want := rep.Boxes[0].Report.PerSnapshot[0].ExclusiveBytes
		if len(got) != 1 || got[0].Store.StoredBytes != want || want == 0 || got[0].Store.Chunks == 0 {
			t.Errorf("store of dev: %+v, want %d stored bytes (boxd report)", got[0].Store, want)
		}
	})

	t.Run("table on a terminal", func(t *testing.T) {
		ptmx, tty, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer ptmx.Close()
		cmd := command(root, "stats")
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		tty.Close()
		screen := newScreen(ptmx)
		// Drawn at least twice, each time from the top of a cleared screen.
		screen.wait(t, "\x1b[H\x1b[2JNAME  STATE    CPU %")
		first := strings.Count(screen.String(), "\x1b[2J")
		deadline := time.Now().Add(time.Minute)
		for strings.Count(screen.String(), "\x1b[2J") == first && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if _, err := ptmx.Write([]byte{3}); err != nil { // ^C
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if strings.Count(screen.String(), "\x1b[2J") < 2 || !strings.Contains(screen.String(), "\r\ndev   running  ") {
			t.Errorf("the terminal shows %q", screen.String())
		}
		if code := cmd.ProcessState.ExitCode(); code != 130 {
			t.Errorf("stats after ^C: exit %d, want 130", code)
		}
	})

	t.Run("stopped", func(t *testing.T) {
		ok(t, root, "stop", "dev")
		if got := stats(t, root); len(got) != 0 {
			t.Errorf("stats without names lists stopped boxes: %+v", got)
		}
		got := stats(t, root, "--all")
		if len(got) != 1 || got[0].State != "stopped" || got[0].Disk == nil || got[0].Disk.Allocated == 0 {
			t.Errorf("stats --all: %+v", got)
		}
		if r := ok(t, root, "stats", "dev", "--no-stream"); !strings.HasPrefix(r.stdout, "NAME  STATE    CPU %  PSS  RSS  DISK") || !strings.Contains(r.stdout, "\ndev   stopped  -      -    -    ") {
			t.Errorf("stats of a stopped box:\n%s", r.stdout)
		}
	})
}

// TestStats runs boxd stats against a real daemon without boxes, and with
// input it refuses.
func TestStats(t *testing.T) {
	root := shortRoot(t)
	notRunning := "boxd daemon is not running on " + root
	fails(t, 8, root, []string{notRunning}, "stats", "--no-stream")
	fails(t, 2, root, []string{`box name "Dev"`}, "stats", "Dev")
	fails(t, 2, root, []string{"--all and box names together"}, "stats", "-a", "dev")

	d := startDaemon(t, root)
	t.Cleanup(func() { _ = d.Process.Signal(syscall.SIGTERM); _ = d.Wait() })
	if got := stats(t, root); len(got) != 0 {
		t.Errorf("stats of no boxes: %+v", got)
	}
	if r := ok(t, root, "stats", "--no-stream", "--all"); r.stdout != "NAME  STATE  CPU %  PSS  RSS  DISK  UPTIME\n" {
		t.Errorf("stats of no boxes: %q", r.stdout)
	}
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "stats", "nope", "--no-stream")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "stats", "nope")
	fails(t, 3, root, []string{`"nope"`, "no such box"}, "stats", "nope", "--json")
}
