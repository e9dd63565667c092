package agent

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/errdefs"
)

// TestMain runs the test binary as the agent's EnterName when it is
// started under that name, as the agent starts itself.
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == EnterName {
		os.Exit(Enter(os.Args[1:], os.Stderr))
	}
	os.Exit(m.Run())
}

// enterRoot is a container root file system with a static busybox.
func enterRoot(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("entering a root file system needs root (mounts, chroot)")
	}
	root := t.TempDir()
	body, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("no static busybox (Debian's busybox-static): %v", err)
	}
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), body, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "id", "pwd", "cat", "ls", "wc"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "work"), 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

// enter runs args in root as the agent does: this test binary under
// EnterName, in a mount namespace of its own.
func enter(t *testing.T, root, cwd string, uid, gid uint32, groups []uint32, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = append([]string{EnterName}, EnterArgs(root, cwd, uid, gid, groups, args)...)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

func TestEnter(t *testing.T) {
	root := enterRoot(t)
	for _, tc := range []struct {
		name     string
		cwd      string
		uid, gid uint32
		groups   []uint32
		env      []string
		args     []string
		want     string // stdout
		wantErr  string // in stderr
		wantCode int
	}{
		{name: "credentials and folder", cwd: "/work", uid: 1000, gid: 1001, groups: []uint32{5, 6}, env: []string{"PATH=/bin"},
			args: []string{"sh", "-c", "id -u; id -g; id -G; pwd; echo $PATH"}, want: "1000\n1001\n1001 5 6\n/work\n/bin\n"},
		{name: "the box's /proc, /sys and /dev", env: []string{"PATH=/bin"},
			args: []string{"sh", "-c", "cat /proc/self/comm; ls /sys/kernel >/dev/null && echo sys; ls /dev/null"}, want: "cat\nsys\n/dev/null\n"},
		{name: "an exit status passes through", env: []string{"PATH=/bin"}, args: []string{"sh", "-c", "exit 3"}, wantCode: 3},
		{name: "a program that is not there", env: []string{"PATH=/bin"}, args: []string{"nothere"}, wantErr: "nothere", wantCode: 127},
		{name: "an absolute path", args: []string{"/bin/busybox", "echo", "abs"}, want: "abs\n"},
		{name: "a working folder that is not there", cwd: "/nope", env: []string{"PATH=/bin"}, args: []string{"true"}, wantErr: "/nope", wantCode: 126},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, code := enter(t, root, tc.cwd, tc.uid, tc.gid, tc.groups, tc.env, tc.args...)
			if code != tc.wantCode || (tc.want != "" && out != tc.want) || !strings.Contains(errOut, tc.wantErr) {
				t.Fatalf("got %q, stderr %q, exit %d; want %q, stderr with %q, exit %d", out, errOut, code, tc.want, tc.wantErr, tc.wantCode)
			}
		})
	}
	// The binds were the process's alone: none is left in this namespace.
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mi), root) {
		t.Fatalf("mounts under %s are left:\n%s", root, mi)
	}
}

// A kept process in a root of its own: the program and folder are the
// root's, a missing program is refused as without a root, and the
// credentials are taken inside.
func TestProcessRoot(t *testing.T) {
	root := enterRoot(t)
	c := serve(t, &ServerConfig{})
	env := []string{"PATH=/bin"}
	code, out, errOut, err := runKept(t, c, ProcessSpec{
		ID: "in-root", Root: root, Cwd: "/work", UID: 1000, GID: 1000, Env: env,
		Args: []string{"sh", "-c", "pwd; id -u; ls /bin/busybox; cat /proc/self/comm"},
	}, nil)
	if err != nil || code != 0 || out != "/work\n1000\n/bin/busybox\ncat\n" {
		t.Fatalf("in the root: code %d, stdout %q, stderr %q, err %v", code, out, errOut, err)
	}
	code, out, _, err = runKept(t, c, ProcessSpec{ID: "tty-root", Root: root, Env: env, Terminal: true, Args: []string{"sh", "-c", "test -t 0 && echo tty"}}, nil)
	if err != nil || code != 0 || out != "tty\r\n" {
		t.Fatalf("a terminal in the root: code %d, stdout %q, err %v", code, out, err)
	}
	for _, tc := range []struct {
		name string
		spec ProcessSpec
	}{
		{"a program the root lacks", ProcessSpec{ID: "r1", Root: root, Env: env, Args: []string{"boxd-no-such-program"}}},
		{"a path the root lacks", ProcessSpec{ID: "r2", Root: root, Args: []string{"/usr/bin/env"}}},
		{"a root that is not there", ProcessSpec{ID: "r3", Root: root + "/nope", Args: []string{"sh"}}},
	} {
		if _, err := c.Process(testCtx(t), tc.spec, ProcessIO{}); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s: %v, want not found", tc.name, err)
		}
	}
}
