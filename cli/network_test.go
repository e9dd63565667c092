package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner/qemu"
	"golang.org/x/sys/unix"
)

// TestFrontDoorForward checks that ssh -L through the front door reaches
// only what the box itself reaches: not the host's loopback at the box's
// gateway, unless the box was made with --expose-host-port for that port.
func TestFrontDoorForward(t *testing.T) {
	if _, err := exec.LookPath("ssh"); err != nil {
		t.Fatalf("OpenSSH's ssh is missing (Debian package openssh-client): %v", err)
	}
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	t.Setenv("HOME", t.TempDir()) // boxd makes ROOT/ssh/id_ed25519 for the boxes
	stop := func(d *exec.Cmd) {
		for _, n := range []string{"shut", "open"} {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	}
	// Boxes outlive a killed daemon: whatever happens, none is left.
	t.Cleanup(func() { qemu.KillMachines(filepath.Join(root, "run")) })
	d := startDaemon(t, root)
	t.Cleanup(func() {
		if d.ProcessState == nil {
			stop(d)
		}
	})
	secret, exposed := hostServer(t, "secret"), hostServer(t, "exposed")
	ok(t, root, "create", "shut", "--image", boxtest.Image, "--memory", "256M")
	ok(t, root, "create", "open", "--image", boxtest.Image, "--memory", "256M", "--expose-host-port", strconv.Itoa(exposed))
	if r := run(t, root, "create", "bad", "--image", boxtest.Image, "--expose-host-port", "70000"); r.code != 2 {
		t.Errorf("--expose-host-port 70000: %v, want exit 2", r)
	}

	for _, tc := range []struct {
		box  string
		port int
		want string // "" for no answer
	}{
		{"shut", secret, ""},
		{"shut", exposed, ""},
		{"open", secret, ""},
		{"open", exposed, "exposed"},
	} {
		if got := forward(t, root, tc.box, tc.port); got != tc.want {
			t.Errorf("ssh -L to 10.0.2.2:%d in box %s answered %q, want %q", tc.port, tc.box, got, tc.want)
		}
	}

	// Boxes outlive a killed daemon, their network helpers with them; the
	// next daemon adopts the boxes and replaces the root's table, and once
	// the boxes are removed no QEMU or passt of theirs is left.
	helpers := children(t, d.Process.Pid, "passt")
	if len(helpers) < 2 {
		t.Fatalf("the daemon runs %d passt processes, want one per box at least", len(helpers))
	}
	boxProcs := append(qemusOfBoxes(t, root), helpers...)
	// The test reaps what the killed daemon leaves, as init would.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) }()
	_ = d.Process.Kill()
	_ = d.Wait()
	time.Sleep(time.Second)
	for _, pid := range boxProcs {
		if syscall.Kill(pid, 0) != nil {
			t.Fatalf("process %d of a box (QEMU or passt) ended with the daemon", pid)
		}
	}
	d2 := startDaemon(t, root)
	if got := forward(t, root, "shut", secret); got != "" {
		t.Errorf("ssh -L to the host's loopback from an adopted box answered %q", got)
	}
	stop(d2)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		left := 0
		for _, pid := range boxProcs {
			var ws unix.WaitStatus
			if n, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); n == 0 && err == nil {
				left++ // still runs
			} else if err != nil && syscall.Kill(pid, 0) == nil {
				left++ // not ours to reap, and still there
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of the removed boxes' QEMU and passt processes %v still run", left, boxProcs)
		}
	}
}

// qemusOfBoxes are the pids of the QEMUs whose machine folder is under
// ROOT/run.
func qemusOfBoxes(t *testing.T, root string) []int {
	t.Helper()
	out, _ := exec.Command("pgrep", "-f", "qemu-system.*"+filepath.Join(root, "run")).Output()
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if n, err := strconv.Atoi(f); err == nil {
			pids = append(pids, n)
		}
	}
	if len(pids) < 2 {
		t.Fatalf("QEMUs of the boxes under %s: %q, want one per box at least", root, out)
	}
	return pids
}

// children are the pids of the processes whose name starts with comm (passt
// may run as passt.avx2) and whose parent is pid.
func children(t *testing.T, pid int, comm string) []int {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, st := range stats {
		b, err := os.ReadFile(st)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
		if open < 0 || end < open || !strings.HasPrefix(string(b[open+1:end]), comm) {
			continue
		}
		f := strings.Fields(string(b[end+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			n, _ := strconv.Atoi(strings.Fields(string(b))[0])
			pids = append(pids, n)
		}
	}
	return pids
}

// hostServer serves body over HTTP on a new port of the host's loopback
// until t ends, and returns the port.
func hostServer(t *testing.T, body string) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, body)
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}

// forward runs boxd ssh NAME -- -N -L LPORT:10.0.2.2:PORT and returns what
// an HTTP GET through the forward answered ("" for nothing).
func forward(t *testing.T, root, name string, port int) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lport := l.Addr().(*net.TCPAddr).Port
	l.Close() // ssh listens here instead
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, boxd, "--root", root, "ssh", name, "--",
		"-N", "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes", "-L", fmt.Sprintf("%d:10.0.2.2:%d", lport, port))
	cmd.Env = append(cmd.Environ(), "BOXD_ROOT=")
	var stderr testutil.LockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	client := &http.Client{Timeout: 20 * time.Second}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(lport)))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ssh -L for box %s did not listen: %s", name, stderr.String())
		}
	}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/", lport))
	if err != nil {
		t.Logf("box %s, 10.0.2.2:%d: %v", name, port, err)
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(b))
}
