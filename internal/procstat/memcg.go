package procstat

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// CgroupFS is where the kernel's cgroup file systems are mounted.
var CgroupFS = "/sys/fs/cgroup"

// MemoryGroups makes memory cgroups that bound one process each, under a
// folder named Parent: nested in the caller's own memory cgroup on cgroup
// v1 (so limits above it still hold), or at the root of the unified
// hierarchy on cgroup v2 (a cgroup with processes cannot lend its
// controllers to children there).
type MemoryGroups struct {
	Parent string
}

// v2 says whether the memory controller is on the unified hierarchy.
func v2() bool {
	b, err := os.ReadFile(filepath.Join(CgroupFS, "cgroup.controllers"))
	return err == nil && bytes.Contains(b, []byte("memory"))
}

// parentDir is the folder the groups go in, made if missing.
func (g MemoryGroups) parentDir() (string, error) {
	var dir string
	if v2() {
		dir = filepath.Join(CgroupFS, g.Parent)
		// The root lends the memory controller to its children; the
		// parent, which has no processes, to the groups.
		_ = os.WriteFile(filepath.Join(CgroupFS, "cgroup.subtree_control"), []byte("+memory"), 0)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+memory"), 0); err != nil {
			return "", fmt.Errorf("enabling the memory controller in %s: %w", dir, err)
		}
		return dir, nil
	}
	own, err := ownMemoryCgroup()
	if err != nil {
		return "", err
	}
	dir = filepath.Join(CgroupFS, "memory", own, g.Parent)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return dir, nil
}

// ownMemoryCgroup is the calling process's cgroup v1 memory cgroup path.
func ownMemoryCgroup() (string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				return parts[2], nil
			}
		}
	}
	if _, err := os.Stat(filepath.Join(CgroupFS, "memory")); err != nil {
		return "", errors.New("no memory cgroup controller is mounted")
	}
	return "/", nil
}

// Bound puts process pid in a new memory cgroup called name whose memory
// (anonymous, shared memory it first touched, page cache) is limited to
// limit bytes: past it the kernel reclaims page cache, then its OOM
// killer ends the process. It returns the cgroup's folder, for Remove.
func (g MemoryGroups) Bound(name string, pid int, limit int64) (string, error) {
	parent, err := g.parentDir()
	if err != nil {
		return "", fmt.Errorf("memory cgroup: %w", err)
	}
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("memory cgroup: %w", err)
	}
	file := "memory.limit_in_bytes"
	if v2() {
		file = "memory.max"
		// No swap either: a box's bound is its memory.
		_ = os.WriteFile(filepath.Join(dir, "memory.swap.max"), []byte("0"), 0)
	}
	if err := os.WriteFile(filepath.Join(dir, file), []byte(strconv.FormatInt(limit, 10)), 0); err != nil {
		_ = os.Remove(dir)
		return "", fmt.Errorf("memory cgroup %s: limit: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		_ = os.Remove(dir)
		return "", fmt.Errorf("memory cgroup %s: moving process %d: %w", dir, pid, err)
	}
	return dir, nil
}

// Path is the folder of the group called name (which may not exist).
func (g MemoryGroups) Path(name string) (string, error) {
	parent, err := g.parentDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(parent, name), nil
}

// Remove removes a cgroup Bound made, once its process has ended (an
// occupied cgroup stays).
func Remove(dir string) error { return os.Remove(dir) }

// RemoveEmpty removes the groups under Parent with no process left (those
// a process that died before it could remove them left), and says how many.
func (g MemoryGroups) RemoveEmpty() int {
	parent, err := g.parentDir()
	if err != nil {
		return 0
	}
	entries, err := os.ReadDir(parent)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if e.IsDir() && os.Remove(filepath.Join(parent, e.Name())) == nil {
			n++
		}
	}
	return n
}

// MemoryLimit reads the limit of the cgroup folder dir.
func MemoryLimit(dir string) (int64, error) {
	for _, f := range []string{"memory.max", "memory.limit_in_bytes"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err == nil {
			return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		}
	}
	return 0, fmt.Errorf("memory cgroup %s: no limit file", dir)
}
