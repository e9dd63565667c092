// Package procstat reads what Linux says of a process in /proc/PID/stat.
package procstat

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// CPUTime is the CPU time (user and system) process pid has used.
func CPUTime(pid int) (time.Duration, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("CPU time of process %d: %w", pid, err)
	}
	return parseCPUTime(stat)
}

// parseCPUTime reads utime and stime from a /proc/PID/stat line: they are
// the 12th and 13th fields after the command name (which is in
// parentheses and may hold spaces), in clock ticks (USER_HZ, 100 on Linux).
func parseCPUTime(stat []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("CPU time: no command name in %q", stat)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("CPU time: %d fields after the command name, want at least 13", len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("CPU time: utime %q or stime %q is not a number", f[11], f[12])
	}
	return time.Duration(ut+st) * (time.Second / 100), nil
}
