package qemu_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/containerd/errdefs"
)

// The environment of adoptHelper, the process that starts machines in
// TestAdopt and is then killed.
const (
	envAdoptHelper = "BOXD_TEST_ADOPT_HELPER" // "KERNEL INITRD DIR MEMDIR CONSOLEDIR"
)

// adoptHelper starts three ticking machines on the folders named in its
// environment, prints "ID PID" for each and waits to be killed.
func adoptHelper(t *testing.T, env string) {
	f := strings.Fields(env)
	r := &qemu.Runner{Dir: f[2], MemDir: f[3], Detached: true}
	for i := range 3 {
		m, err := r.StartMachine(context.Background(), runner.Spec{
			MemSize: 128 << 20, Kernel: f[0], Initrd: f[1], Cmdline: "console=ttyS0 panic=-1 quiet",
			Console: filepath.Join(f[4], fmt.Sprintf("console-%d", i)),
		})
		if err != nil {
			t.Fatal(err)
		}
		fmt.Printf("%s %d\n", m.ID(), m.PID())
	}
	select {}
}

// A machine outlives the process that started it: killed with -9, it
// leaves its machines running, and a runner of another process on the
// same folders adopts one (which then pauses, continues and stops as its
// own), is told that one whose QEMU died meanwhile is gone, and reclaims
// the rest: no QEMU, folder or memory file is left.
func TestAdopt(t *testing.T) {
	if env := os.Getenv(envAdoptHelper); env != "" {
		adoptHelper(t, env)
		return
	}
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	kernel, initrd := guest(ctx, t)
	dir, memDir, consoles := t.TempDir(), shmDir(t), t.TempDir()

	helper := exec.Command(os.Args[0], "-test.run=^TestAdopt$", "-test.v")
	helper.Env = append(os.Environ(), envAdoptHelper+"="+strings.Join([]string{kernel, initrd, dir, memDir, consoles}, " "))
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	helper.Stderr = os.Stderr
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	var ids []string
	var pids []int
	sc := bufio.NewScanner(out)
	for len(ids) < 3 && sc.Scan() {
		var id string
		var pid int
		if _, err := fmt.Sscanf(sc.Text(), "%s %d", &id, &pid); err == nil && strings.HasPrefix(id, "qemu-") {
			ids, pids = append(ids, id), append(pids, pid)
		}
	}
	t.Cleanup(func() {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	if len(ids) < 3 {
		_ = helper.Process.Kill()
		_ = helper.Wait()
		t.Fatalf("the helper started %d machines, want 3", len(ids))
	}
	_ = helper.Process.Kill()
	_ = helper.Wait()

	// Machine 0 ticks on without the process that started it.
	console := filepath.Join(consoles, "console-0")
	before := waitConsoleTick(ctx, t, console, 0)
	waitConsoleTick(ctx, t, console, before+2)

	// Machine 1's QEMU dies while nobody watches it.
	if err := syscall.Kill(pids[1], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for syscall.Kill(pids[1], 0) == nil {
		time.Sleep(10 * time.Millisecond)
	}

	r := &qemu.Runner{Dir: dir, MemDir: memDir}
	rm, err := r.Adopt(ctx, ids[0])
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	m := rm.(*qemu.Machine)
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	if m.PID() != pids[0] || m.ID() != ids[0] {
		t.Fatalf("adopted pid %d, id %s; want %d, %s", m.PID(), m.ID(), pids[0], ids[0])
	}
	if _, err := r.Adopt(ctx, ids[0]); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("a second Adopt = %v, want ErrAlreadyExists", err)
	}
	if _, err := r.Adopt(ctx, ids[1]); !errors.Is(err, qemu.ErrGone) || !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Adopt of a machine whose QEMU died = %v, want ErrGone", err)
	}
	folders, _ := r.Reclaim()
	if folders != 2 {
		t.Fatalf("Reclaim removed %d machine folders, want 2 (the dead machine's, the unadopted one's)", folders)
	}
	// Reclaim waits for the exit; the process's new parent reaps it.
	for i := 0; syscall.Kill(pids[2], 0) == nil; i++ {
		if i == 200 {
			t.Fatalf("the machine nobody adopted (pid %d) still runs after Reclaim", pids[2])
		}
		time.Sleep(10 * time.Millisecond)
	}

	if err := m.Pause(ctx); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	if st, err := m.Status(ctx); err != nil || st != "paused" {
		t.Fatalf("after Pause, query-status = %q, %v", st, err)
	}
	paused := lastTick(m.Console())
	if err := m.Continue(ctx); err != nil {
		t.Fatalf("Continue: %v", err)
	}
	waitTick(ctx, t, m, paused+1)
	if _, err := m.CPUTime(); err != nil {
		t.Fatalf("CPUTime of an adopted machine: %v", err)
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(m.Err(), runner.ErrStopped) {
		t.Fatalf("Err after Stop = %v, want ErrStopped", m.Err())
	}
	for i := 0; syscall.Kill(pids[0], 0) == nil; i++ {
		if i == 200 {
			t.Fatalf("QEMU (pid %d) runs after Stop", pids[0])
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, d := range []string{dir, memDir} {
		if entries, _ := os.ReadDir(d); len(entries) != 0 {
			t.Fatalf("left in %s: %v", d, entries)
		}
	}
}

// An adopted machine whose QEMU ends says so: Done closes, Err is not
// ErrStopped.
func TestAdoptedMachineExit(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a Linux guest under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	kernel, initrd := guest(ctx, t)
	dir, memDir := t.TempDir(), shmDir(t)
	r1 := &qemu.Runner{Dir: dir, MemDir: memDir}
	m1, err := r1.StartMachine(ctx, runner.Spec{MemSize: 128 << 20, Kernel: kernel, Initrd: initrd, Cmdline: "console=ttyS0 panic=-1 quiet"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m1.Stop(context.Background()) })
	// The starting runner lets go of QMP, as a killed boxd would.
	qemu.DropQMP(m1)
	r2 := &qemu.Runner{Dir: dir, MemDir: memDir}
	rm, err := r2.Adopt(ctx, m1.ID())
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if err := syscall.Kill(m1.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-rm.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after the adopted QEMU was killed")
	}
	if rm.Err() == nil || errors.Is(rm.Err(), runner.ErrStopped) {
		t.Fatalf("Err = %v, want why QEMU exited", rm.Err())
	}
	t.Log(rm.Err())
}

// waitConsoleTick polls a console file until it shows a tick of at least
// want.
func waitConsoleTick(ctx context.Context, t *testing.T, path string, want int) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for {
		b, _ := os.ReadFile(path)
		if n := lastTick(b); n >= want {
			return n
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no tick >= %d in %s: %v", want, path, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestKillMachinesUnrecorded checks that a machine folder without a state
// file (its runner was killed between starting QEMU and writing the file)
// still has its process killed: the process's arguments name the folder.
func TestKillMachinesUnrecorded(t *testing.T) {
	dir := t.TempDir()
	folder := filepath.Join(dir, "qemu-1-1-x")
	if err := os.Mkdir(folder, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(folder, "qmp.sock")
	if err := os.WriteFile(sock, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	other := exec.Command("tail", "-f", "/dev/null") // names no folder: left alone
	orphan := exec.Command("tail", "-f", sock)
	for _, c := range []*exec.Cmd{other, orphan} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
	}
	exited := make(chan error, 1)
	go func() { exited <- orphan.Wait() }()
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })

	if n := qemu.KillMachines(dir); n != 1 {
		t.Fatalf("KillMachines removed %d folders, want 1", n)
	}
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		_ = orphan.Process.Kill()
		t.Fatal("the process naming the folder still runs")
	}
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("a process naming no folder was killed: %v", err)
	}
	if _, err := os.Stat(folder); !os.IsNotExist(err) {
		t.Fatalf("the folder is still there: %v", err)
	}
}
