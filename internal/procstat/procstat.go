// Package procstat reads what Linux says of a process (/proc/PID/stat,
// /proc/PID/smaps_rollup) and of the host (/proc/meminfo), and sets a
// process's OOM-killer score.
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

// MemTotal is the host's RAM in bytes (MemTotal in /proc/meminfo).
func MemTotal() (int64, error) { return meminfo("MemTotal") }

// MemAvailable is the memory the host can give without swapping, in bytes
// (MemAvailable in /proc/meminfo).
func MemAvailable() (int64, error) { return meminfo("MemAvailable") }

func meminfo(key string) (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("host memory: %w", err)
	}
	return parseMeminfo(b, key)
}

// parseMeminfo reads the line key from a /proc/meminfo text, in bytes.
func parseMeminfo(meminfo []byte, key string) (int64, error) {
	for line := range bytes.Lines(meminfo) {
		rest, ok := bytes.CutPrefix(line, []byte(key+":"))
		if !ok {
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) != 2 || f[1] != "kB" {
			break
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			break
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("host memory: no %s line in kB in /proc/meminfo", key)
}

// SetOOMScoreAdj sets process pid's oom_score_adj (-1000 to 1000): how much
// more (or less) the kernel's OOM killer favours killing it. Lowering it
// needs CAP_SYS_RESOURCE.
func SetOOMScoreAdj(pid, adj int) error {
	if adj < -1000 || adj > 1000 {
		return fmt.Errorf("oom_score_adj %d: want -1000 to 1000", adj)
	}
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid), []byte(strconv.Itoa(adj)), 0); err != nil {
		return fmt.Errorf("oom_score_adj of process %d: %w", pid, err)
	}
	return nil
}

// StartTime is when process pid started, in clock ticks since boot
// (field 22 of /proc/PID/stat): with the pid it names one process, even
// after the pid is reused.
func StartTime(pid int) (uint64, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStartTime(stat)
}

func parseStartTime(stat []byte) (uint64, error) {
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("start time: no command name in %q", stat)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("start time: %d fields after the command name, want at least 20", len(f))
	}
	return strconv.ParseUint(f[19], 10, 64)
}
