package procstat

import (
	"os"
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
