package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// hostMem is what one box's machine holds of the host's memory.
type hostMem struct {
	PID       int    `json:"pid"`
	MemFile   string `json:"mem_file"`
	Pss       int64  `json:"pss_bytes"`       // QEMU's proportional set size (smaps_rollup Pss)
	PssShmem  int64  `json:"pss_shmem_bytes"` // the part of it that is shared memory: the memory file's pages QEMU maps
	FileAlloc int64  `json:"file_allocated_bytes"`
	FileSize  int64  `json:"file_size_bytes"`
}

// Total is the host memory the box holds, each page once: QEMU's PSS
// without its shared-memory part, plus every page allocated to the memory
// file (mapped by QEMU or not).
func (h hostMem) Total() int64 { return h.Pss - h.PssShmem + h.FileAlloc }

// boxQEMU is the pid of the QEMU of box name: the machine the box's
// machine file names, whose state file gives its pid (a machine that took
// over a spare names no console of the box on its command line).
func (b *bench) boxQEMU(ctx context.Context, name string) (int, error) {
	id, err := os.ReadFile(filepath.Join(b.boxd.Root, "boxes", name, "machine"))
	if err != nil {
		return 0, fmt.Errorf("box %s names no machine: %w", name, err)
	}
	dirs, _ := filepath.Glob(filepath.Join(b.boxd.Root, "run", strings.TrimSpace(string(id))+"-*"))
	if len(dirs) != 1 {
		return 0, fmt.Errorf("box %s: machine %s has %d folders, want 1", name, strings.TrimSpace(string(id)), len(dirs))
	}
	raw, err := os.ReadFile(filepath.Join(dirs[0], "state.json"))
	if err != nil {
		return 0, fmt.Errorf("box %s: %w", name, err)
	}
	var st struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return 0, fmt.Errorf("box %s: machine state %s: %w", name, dirs[0], err)
	}
	if st.PID <= 0 {
		return 0, fmt.Errorf("box %s: machine state %s names no pid", name, dirs[0])
	}
	if err := syscall.Kill(st.PID, 0); err != nil {
		return 0, fmt.Errorf("box %s: QEMU %d: %w", name, st.PID, err)
	}
	return st.PID, ctx.Err()
}

// measureHostMem reads box name's QEMU's smaps_rollup and its memory file
// (mem-path= of its command line) on the host.
func (b *bench) measureHostMem(ctx context.Context, name string) (hostMem, error) {
	pid, err := b.boxQEMU(ctx, name)
	if err != nil {
		return hostMem{}, err
	}
	h := hostMem{PID: pid}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return h, err
	}
	for arg := range bytes.SplitSeq(cmdline, []byte{0}) {
		if _, rest, ok := strings.Cut(string(arg), "mem-path="); ok {
			h.MemFile, _, _ = strings.Cut(rest, ",")
		}
	}
	if h.MemFile == "" {
		return h, fmt.Errorf("box %s: QEMU %d's command line has no mem-path=", name, pid)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(h.MemFile, &st); err != nil {
		return h, fmt.Errorf("box %s's memory file: %w", name, err)
	}
	h.FileAlloc, h.FileSize = st.Blocks*512, st.Size // st_blocks counts 512-byte units
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return h, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) != 2 || fields[1] != "kB" {
			continue
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "Pss":
			h.Pss = kb << 10
		case "Pss_Shmem":
			h.PssShmem = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		return h, err
	}
	if h.Pss == 0 {
		return h, fmt.Errorf("box %s: QEMU %d's smaps_rollup gives no Pss", name, pid)
	}
	return h, nil
}
