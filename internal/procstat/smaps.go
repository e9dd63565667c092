package procstat

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Rollup is a process's resident memory as /proc/PID/smaps_rollup sums
// it over all its mappings, in bytes.
type Rollup struct {
	// RSS counts each resident page the process maps in full, however
	// many processes map it too.
	RSS int64
	// PSS counts a page that n processes map as 1/n of it, so that the
	// PSS of processes sharing memory adds up to that memory once.
	PSS int64
}

// MemoryRollup reads process pid's Rollup. Reading another user's process
// needs the right to ptrace it.
func MemoryRollup(pid int) (Rollup, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Rollup{}, fmt.Errorf("memory of process %d: %w", pid, err)
	}
	return parseRollup(b)
}

// parseRollup reads the Rss and Pss lines of a smaps_rollup text: a header
// line naming the range of addresses, then "Key:  N kB" lines.
func parseRollup(b []byte) (Rollup, error) {
	var r Rollup
	found := map[string]bool{}
	for line := range bytes.Lines(b) {
		key, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		var dst *int64
		switch string(key) {
		case "Rss":
			dst = &r.RSS
		case "Pss":
			dst = &r.PSS
		default:
			continue
		}
		f := strings.Fields(string(rest))
		if len(f) != 2 || f[1] != "kB" {
			return Rollup{}, fmt.Errorf("smaps_rollup: %s line %q is not in kB", key, bytes.TrimSpace(line))
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil || kb < 0 {
			return Rollup{}, fmt.Errorf("smaps_rollup: %s %q is not a number of kB", key, f[0])
		}
		*dst = kb << 10
		found[string(key)] = true
	}
	if !found["Rss"] || !found["Pss"] {
		return Rollup{}, fmt.Errorf("smaps_rollup: no Rss or Pss line")
	}
	return r, nil
}
