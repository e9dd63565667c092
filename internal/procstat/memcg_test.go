package procstat

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Bound on a cgroup v2 file system laid out in a folder: the controller
// lent down, the limit, no swap, the process moved.
func TestMemoryGroupsV2(t *testing.T) {
	fs := t.TempDir()
	old := CgroupFS
	CgroupFS = fs
	t.Cleanup(func() { CgroupFS = old })
	if err := os.WriteFile(filepath.Join(fs, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir, err := MemoryGroups{Parent: "boxd-test"}.Bound("qemu-1-1", 4242, 300<<20)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(fs, "boxd-test", "qemu-1-1"); dir != want {
		t.Fatalf("group at %s, want %s", dir, want)
	}
	for file, want := range map[string]string{
		filepath.Join(fs, "cgroup.subtree_control"):              "+memory",
		filepath.Join(fs, "boxd-test", "cgroup.subtree_control"): "+memory",
		filepath.Join(dir, "memory.max"):                         "314572800",
		filepath.Join(dir, "memory.swap.max"):                    "0",
		filepath.Join(dir, "cgroup.procs"):                       "4242",
	} {
		b, err := os.ReadFile(file)
		if err != nil || strings.TrimSpace(string(b)) != want {
			t.Errorf("%s: %q, %v; want %q", file, b, err, want)
		}
	}
	if n, err := MemoryLimit(dir); err != nil || n != 300<<20 {
		t.Errorf("MemoryLimit: %d, %v", n, err)
	}
}
