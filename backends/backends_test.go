package backends

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/boxd-dev/boxd/internal/procstat"
)

// Memory folders of daemons that are gone are reclaimed; those of live
// daemons, those without an owner and the caller's own are left alone.
func TestReclaimMemDirs(t *testing.T) {
	parent := t.TempDir()
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	folders := map[string]string{ // folder: owner file ("" for none)
		"boxd-dead":     fmt.Sprintf("%d /var/lib/a\n", dead.Process.Pid),
		"boxd-live":     fmt.Sprintf("%d /var/lib/b\n", os.Getpid()),
		"boxd-noowner":  "",
		"boxd-mine":     fmt.Sprintf("%d /var/lib/c\n", dead.Process.Pid),
		"other-dead":    fmt.Sprintf("%d /var/lib/d\n", dead.Process.Pid),
		"boxd-badowner": "not a pid\n",
		"boxd-running":  fmt.Sprintf("%d %s\n", dead.Process.Pid, runningRoot(t)),
	}
	for name, owner := range folders {
		dir := filepath.Join(parent, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "frozen-1.mem"), make([]byte, 64<<10), 0o600); err != nil {
			t.Fatal(err)
		}
		if owner != "" {
			if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	freed, n := reclaimMemDirs(parent, filepath.Join(parent, "boxd-mine"))
	if n != 1 || freed < 64<<10 {
		t.Fatalf("reclaimed %d folders, %d bytes; want 1 folder of at least 64 KiB", n, freed)
	}
	for name := range folders {
		_, err := os.Stat(filepath.Join(parent, name))
		if gone := os.IsNotExist(err); gone != (name == "boxd-dead") {
			t.Errorf("%s: gone %v", name, gone)
		}
	}
}

// New takes the root's memory folder and says whose it is; Reclaim then
// removes a dead predecessor's files that were not adopted.
func TestNewTakesMemDir(t *testing.T) {
	mem := filepath.Join(t.TempDir(), "mem")
	if err := os.MkdirAll(mem, 0o700); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(mem, "frozen-9-9-x.mem")
	if err := os.WriteFile(left, []byte("left by a killed boxd"), 0o600); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	for _, d := range []string{"run/qemu-77-1-abc", "run/disks"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s := New(Config{Root: root, MemDir: mem})
	if _, err := os.Stat(left); err != nil {
		t.Fatalf("a memory file went before the machines were adopted: %v", err)
	}
	s.Reclaim()
	if _, err := os.Stat(filepath.Join(root, "run/qemu-77-1-abc")); !os.IsNotExist(err) {
		t.Fatalf("a dead boxd's machine folder is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "run/disks")); err != nil {
		t.Fatalf("the exported disks went: %v", err)
	}
	if _, err := os.Stat(left); !os.IsNotExist(err) {
		t.Fatalf("a dead boxd's memory file is still there: %v", err)
	}
	owner, err := os.ReadFile(filepath.Join(mem, ownerFile))
	if err != nil || string(owner[:len(fmt.Sprint(os.Getpid()))]) != fmt.Sprint(os.Getpid()) {
		t.Fatalf("owner file %q, %v: want this process's pid first", owner, err)
	}
	if len(s.Runners) != 2 || s.Runners[0].Name() != Default {
		t.Fatalf("runners %v, want the default first", s.Runners)
	}
	if err := s.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(mem); !os.IsNotExist(err) {
		t.Fatalf("the memory folder outlived Close with no machine left: %v", err)
	}
}

// runningRoot is a root whose daemon is gone but whose machine runs on:
// this process stands for its QEMU.
func runningRoot(t *testing.T) string {
	root := t.TempDir()
	dir := filepath.Join(root, "run", "qemu-1-1-x")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ticks, err := procstat.StartTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	state := fmt.Sprintf(`{"pid": %d, "start_ticks": %d, "ready": true}`, os.Getpid(), ticks)
	if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte(state), 0o600); err != nil {
		t.Fatal(err)
	}
	return root
}
