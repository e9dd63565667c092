package procstat

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestParseCPUTime(t *testing.T) {
	for _, tc := range []struct {
		name string
		stat string
		want time.Duration
		bad  bool
	}{
		{"plain", "42 (qemu) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0", 3 * time.Second, false},
		{"spaces and parens in the name", "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0", 30 * time.Millisecond, false},
		{"short", "7 (x) R 1 2 3", 0, true},
		{"no name", "7 x R", 0, true},
		{"not a number", "7 (x) R 1 7 7 0 -1 0 0 0 0 0 a 2", 0, true},
	} {
		got, err := parseCPUTime([]byte(tc.stat))
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("%s: %v, %v; want %v (error %v)", tc.name, got, err, tc.want, tc.bad)
		}
	}
}

// This process burns some CPU and then has used some.
func TestCPUTimeOfSelf(t *testing.T) {
	end := time.Now().Add(30 * time.Millisecond)
	for time.Now().Before(end) {
	}
	d, err := CPUTime(os.Getpid())
	if err != nil || d <= 0 {
		t.Fatalf("CPUTime of this process: %v, %v", d, err)
	}
	if _, err := CPUTime(-1); err == nil {
		t.Fatal("CPUTime of no process succeeded")
	}
}

func TestParseMemTotal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		bad  bool
	}{
		{"MemTotal:       24562972 kB\nMemFree:  1 kB\n", 24562972 << 10, false},
		{"MemFree:  1 kB\nMemTotal: 2048 kB\n", 2 << 20, false},
		{"MemFree:  1 kB\n", 0, true},
		{"MemTotal: 12 MB\n", 0, true},
		{"MemTotal: x kB\n", 0, true},
	} {
		got, err := parseMeminfo([]byte(tc.in), "MemTotal")
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("%q: %d, %v; want %d (error %v)", tc.in, got, err, tc.want, tc.bad)
		}
	}
	if n, err := MemTotal(); err != nil || n < 64<<20 {
		t.Fatalf("MemTotal of this host: %d, %v", n, err)
	}
	if n, err := MemAvailable(); err != nil || n <= 0 {
		t.Fatalf("MemAvailable of this host: %d, %v", n, err)
	}
}

func TestSetOOMScoreAdj(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	if err := SetOOMScoreAdj(cmd.Process.Pid, 123); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", cmd.Process.Pid))
	if err != nil || strings.TrimSpace(string(got)) != "123" {
		t.Fatalf("oom_score_adj after setting 123: %q, %v", got, err)
	}
	for _, bad := range []int{-1001, 1001} {
		if err := SetOOMScoreAdj(cmd.Process.Pid, bad); err == nil {
			t.Errorf("oom_score_adj %d accepted", bad)
		}
	}
}

func TestParseStartTime(t *testing.T) {
	got, err := parseStartTime([]byte("42 (q (x) emu) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 123456 99 7"))
	if err != nil || got != 123456 {
		t.Fatalf("%d, %v; want 123456", got, err)
	}
	if _, err := parseStartTime([]byte("7 (x) R 1 2 3")); err == nil {
		t.Fatal("a short line parsed")
	}
	self, err := StartTime(os.Getpid())
	if err != nil || self == 0 {
		t.Fatalf("this process's start time: %d, %v", self, err)
	}
}
