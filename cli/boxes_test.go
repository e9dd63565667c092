package cli_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"
)

// TestBoxCommandsQEMU runs the box commands against the real daemon, whose
// boxes boot under QEMU: exec streaming its input and output, exit
// statuses and a pty; a box's console, tailed and followed; pause and
// unpause; a box made from a snapshot.
func TestBoxCommandsQEMU(t *testing.T) {
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d := startDaemon(t, root)
	t.Cleanup(func() {
		// Boxes go first, so that their machines' memory goes with them;
		// then the daemon exits as it would on SIGTERM.
		for _, n := range []string{"dev", "copy"} {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	key := writeKey(t)
	r := ok(t, root, "create", "dev", "--image", boxtest.Image, "--memory", "256M", "--runner", "qemu", "--ssh-key", key)
	if !strings.HasPrefix(r.stdout, "box dev is running (image "+boxtest.Image+", 256 MiB, 1 vCPU)") {
		t.Errorf("create: %q", r.stdout)
	}

	t.Run("exec streams", func(t *testing.T) {
		// The command waits for input that is given only once its first
		// line has come out of boxd.
		cmd := command(root, "exec", "dev", "--", "sh", "-c", `echo first; read line; echo "got $line"; echo warn >&2; exit 3`)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		out := bufio.NewReader(stdout)
		first := make(chan string, 1)
		go func() {
			line, _ := out.ReadString('\n')
			first <- line
		}()
		select {
		case line := <-first:
			if line != "first\n" {
				t.Fatalf("first line %q", line)
			}
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
			t.Fatal("the command's first line did not come out while it waited for input")
		}
		if _, err := io.WriteString(stdin, "hello\n"); err != nil {
			t.Fatal(err)
		}
		stdin.Close()
		rest, _ := io.ReadAll(out)
		err = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 3 {
			t.Errorf("exit %d (%v), want 3", code, err)
		}
		if string(rest) != "got hello\n" || stderr.String() != "warn\n" {
			t.Errorf("then stdout %q, stderr %q", rest, stderr.String())
		}
	})

	t.Run("exec", func(t *testing.T) {
		for _, tc := range []struct {
			args   []string
			stdin  string
			code   int
			stdout string // "" checks nothing; else what stdout holds
		}{
			{[]string{"exec", "dev", "--", "sh", "-c", "exit 3"}, "", 3, ""},
			{[]string{"exec", "dev", "--", "no-such-command"}, "", 127, ""},
			{[]string{"exec", "dev", "cat"}, "piped\n", 0, "piped\n"},
			{[]string{"exec", "-i", "dev", "cat"}, "piped\n", 0, "piped\n"},
			{[]string{"exec", "-n", "dev", "--", "wc", "-c"}, "piped\n", 0, "0\n"},
			{[]string{"exec", "-t", "dev", "--", "sh", "-c", "tty; test -t 0 && test -t 1 && echo on-a-tty"}, "", 0, "/dev/pts/"},
			{[]string{"exec", "-it", "dev", "--", "sh", "-c", "test -t 0 && echo on-a-tty"}, "", 0, "on-a-tty"},
			{[]string{"exec", "dev", "--", "sh", "-c", "test -t 0"}, "", 1, ""},
		} {
			t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
				cmd := command(root, tc.args...)
				cmd.Stdin = strings.NewReader(tc.stdin)
				var stdout, stderr strings.Builder
				cmd.Stdout, cmd.Stderr = &stdout, &stderr
				_ = cmd.Run()
				if code := cmd.ProcessState.ExitCode(); code != tc.code {
					t.Errorf("exit %d, want %d; stdout %q, stderr %q", code, tc.code, stdout.String(), stderr.String())
				}
				if tc.stdout != "" && !strings.Contains(stdout.String(), tc.stdout) {
					t.Errorf("stdout %q, want %q in it", stdout.String(), tc.stdout)
				}
				if strings.Contains(stderr.String(), "boxd:") {
					t.Errorf("boxd complained: %q", stderr.String())
				}
			})
		}
		var res struct {
			ExitCode int    `json:"exit_code"`
			Stdout   []byte `json:"stdout"`
			Stderr   []byte `json:"stderr"`
		}
		r := run(t, root, "exec", "dev", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
		if r.code != 3 {
			t.Errorf("exec --json: %v", r)
		}
		decodeJSON(t, r.stdout, &res)
		if res.ExitCode != 3 || string(res.Stdout) != "out\n" || string(res.Stderr) != "err\n" {
			t.Errorf("exec --json: %+v", res)
		}
	})

	t.Run("exec -it on a terminal", func(t *testing.T) {
		ptmx, tty, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer ptmx.Close()
		if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 33, Cols: 111}); err != nil {
			t.Fatal(err)
		}
		before, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		cmd := command(root, "exec", "-it", "dev", "--", "sh", "-c",
			`trap 'stty size' WINCH; trap 'echo interrupted; exit 6' INT; stty size; echo ready; i=0; while [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; exit 9`)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		// boxd's terminal is its controlling one, so that it gets SIGWINCH.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		screen := newScreen(ptmx)
		screen.wait(t, "33 111\r\nready")
		// Raw while the command runs.
		st, err := unix.IoctlGetTermios(int(tty.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		if st.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != 0 {
			t.Errorf("boxd's terminal is not in raw mode: lflag %#x", st.Lflag)
		}
		if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 44, Cols: 122}); err != nil {
			t.Fatal(err)
		}
		screen.wait(t, "44 122")
		// ^C goes to the command, not to boxd.
		if _, err := ptmx.Write([]byte{3}); err != nil {
			t.Fatal(err)
		}
		tty.Close()
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 6 {
			t.Errorf("after ^C: exit %d; the terminal shows %q", code, screen.String())
		}
		// boxd wrote the command's last output before it exited; the
		// screen reads it from the terminal in its own time.
		screen.wait(t, "interrupted")
		after, err := unix.IoctlGetTermios(int(ptmx.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		if after.Lflag != before.Lflag || after.Iflag != before.Iflag || after.Oflag != before.Oflag {
			t.Errorf("boxd left its terminal changed: lflag %#x iflag %#x oflag %#x, were %#x %#x %#x",
				after.Lflag, after.Iflag, after.Oflag, before.Lflag, before.Iflag, before.Oflag)
		}
	})

	t.Run("logs", func(t *testing.T) {
		all := ok(t, root, "logs", "dev").stdout
		if !strings.Contains(all, "boxd-agent: ready") {
			t.Errorf("logs of a booted box: %q, want the agent's ready line", all)
		}
		lines := strings.SplitAfter(all, "\n")
		if lines[len(lines)-1] == "" {
			lines = lines[:len(lines)-1]
		}
		for _, n := range []int{0, 1, 3, 100000} {
			got := ok(t, root, "logs", "dev", "--tail", strconv.Itoa(n)).stdout
			if want := strings.Join(lines[len(lines)-min(n, len(lines)):], ""); got != want {
				t.Errorf("logs --tail %d: %q, want %q", n, got, want)
			}
		}

		// On a terminal, the firmware's screen resets are left out.
		ptmx, tty, err := pty.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer ptmx.Close()
		screen := newScreen(ptmx)
		onTerm := command(root, "logs", "dev")
		onTerm.Stdout, onTerm.Stderr = tty, tty
		if err := onTerm.Run(); err != nil {
			t.Fatalf("logs on a terminal: %v", err)
		}
		tty.Close()
		screen.wait(t, "boxd-agent: ready")
		if got := screen.String(); strings.Contains(got, "\x1bc") || strings.Contains(got, "\x1b[2J") || strings.Contains(got, "\x1b[?7l") {
			t.Errorf("logs on a terminal passed on sequences that change it: %q", got)
		}

		// A follow prints what the box writes later: kernel messages of
		// level err pass the kernel's "quiet", and /dev/console always.
		cmd := command(root, "logs", "-f", "dev")
		out := &testutil.LockedBuffer{}
		var stderr strings.Builder
		cmd.Stdout, cmd.Stderr = out, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = cmd.Process.Kill() }()
		out.WaitFor(t, "boxd-agent: ready", time.Minute)
		ok(t, root, "exec", "dev", "--", "sh", "-c", "echo '<3>logs-test: to kmsg' > /dev/kmsg; echo 'logs-test: to the console' > /dev/console")
		out.WaitFor(t, "logs-test: to kmsg", time.Minute)
		out.WaitFor(t, "logs-test: to the console", time.Minute)
		if n := followers(t, d.Process.Pid); n != 1 {
			t.Errorf("the daemon has %d consoles open for one follow", n)
		}
		// ^C ends it, as a shell reports it, and the daemon lets go.
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 130 || stderr.String() != "" {
			t.Errorf("logs -f after ^C: exit %d, stderr %q", code, stderr.String())
		}
		waitFollowers(t, d.Process.Pid, 0)
		if got := ok(t, root, "logs", "dev", "-n", "2").stdout; !strings.Contains(got, "logs-test: to kmsg") || !strings.Contains(got, "logs-test: to the console") {
			t.Errorf("logs -n 2 after the follow: %q", got)
		}
		fails(t, 3, root, []string{`"nope"`, "no such box"}, "logs", "nope")
	})

	t.Run("pause", func(t *testing.T) {
		if r := ok(t, root, "pause", "dev"); !strings.HasPrefix(r.stdout, "box dev is paused") {
			t.Errorf("pause: %q", r.stdout)
		}
		if ls := ok(t, root, "ls").stdout; !strings.Contains(ls, "dev   paused") {
			t.Errorf("ls of a paused box:\n%s", ls)
		}
		var boxes []map[string]any
		decodeJSON(t, ok(t, root, "ls", "--json").stdout, &boxes)
		if len(boxes) != 1 || boxes[0]["state"] != "paused" {
			t.Errorf("ls --json: %v", boxes)
		}
		var bx map[string]any
		decodeJSON(t, ok(t, root, "unpause", "dev", "--json").stdout, &bx)
		if bx["name"] != "dev" || bx["state"] != "running" {
			t.Errorf("unpause --json: %v", bx)
		}
		decodeJSON(t, ok(t, root, "--json", "pause", "dev").stdout, &bx)
		if bx["state"] != "paused" {
			t.Errorf("pause --json: %v", bx)
		}
		// A use unpauses it.
		if r := ok(t, root, "exec", "dev", "echo", "awake"); r.stdout != "awake\n" {
			t.Errorf("exec in a paused box: %v", r)
		}
		if ls := ok(t, root, "ls").stdout; !strings.Contains(ls, "dev   running") {
			t.Errorf("ls after an exec woke the box:\n%s", ls)
		}
		fails(t, 3, root, []string{`"nope"`, "no such box"}, "pause", "nope")
	})

	t.Run("create --from", func(t *testing.T) {
		ok(t, root, "exec", "dev", "--", "sh", "-c", "echo parent > /root/parent.txt")
		ok(t, root, "snapshot", "dev", "--name", "s1")
		r := ok(t, root, "create", "copy", "--from", "box.dev.s1", "--ssh-key", key)
		if !strings.HasPrefix(r.stdout, "box copy is running (from box.dev.s1, 256 MiB, 1 vCPU)") {
			t.Errorf("create --from: %q", r.stdout)
		}
		if r := ok(t, root, "exec", "copy", "--", "sh", "-c", "hostname; cat /root/parent.txt"); r.stdout != "copy\nparent\n" {
			t.Errorf("the new box: %q", r.stdout)
		}
		var boxes []struct {
			Name, State, Parent, Image string
		}
		if err := json.Unmarshal([]byte(ok(t, root, "ls", "--json").stdout), &boxes); err != nil {
			t.Fatal(err)
		}
		if len(boxes) != 2 || boxes[0].Name != "copy" || boxes[0].Parent != "dev" || boxes[0].State != "running" || boxes[0].Image != boxtest.Image {
			t.Errorf("ls --json: %+v", boxes)
		}
		fails(t, 3, root, []string{`no snapshot "box.dev.nope"`}, "create", "other", "--from", "box.dev.nope", "--ssh-key", key)
		fails(t, 2, root, []string{`snapshot "image.` + boxtest.Image + `" was not taken by a box`}, "create", "other", "--from", "image."+boxtest.Image, "--ssh-key", key)
		fails(t, 4, root, []string{`"copy"`, "already exists"}, "create", "copy", "--from", "box.dev.s1", "--ssh-key", key)
	})

	t.Run("logs -f of a box removed", func(t *testing.T) {
		cmd := command(root, "logs", "-f", "copy")
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			close(done)
		}()
		defer func() { _ = cmd.Process.Kill() }()
		waitFollowers(t, d.Process.Pid, 1)
		ok(t, root, "rm", "copy")
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Fatal("logs -f goes on after its box was removed")
		}
		if code := cmd.ProcessState.ExitCode(); code != 0 || stderr.String() != "" {
			t.Errorf("logs -f of a removed box: exit %d, stderr %q", code, stderr.String())
		}
		waitFollowers(t, d.Process.Pid, 0)
	})
}

// followers counts the box consoles process pid has open: for the daemon,
// the follows in progress (QEMU, not the daemon, writes them).
func followers(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && strings.HasSuffix(target, "/console.log") {
			n++
		}
	}
	return n
}

// waitFollowers waits until process pid has n box consoles open.
func waitFollowers(t *testing.T, pid, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for followers(t, pid) != n {
		if time.Now().After(deadline) {
			t.Fatalf("the daemon has %d consoles open, want %d", followers(t, pid), n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// screen collects what a program writes on a terminal, from its master
// side.
type screen struct {
	mu   sync.Mutex
	buf  strings.Builder
	more chan struct{} // closed and replaced on each write
}

func newScreen(ptmx io.Reader) *screen {
	s := &screen{more: make(chan struct{})}
	go func() {
		b := make([]byte, 4096)
		for {
			n, err := ptmx.Read(b)
			s.mu.Lock()
			s.buf.Write(b[:n])
			close(s.more)
			s.more = make(chan struct{})
			s.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return s
}

func (s *screen) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// wait waits until the screen shows want, failing t after a minute.
func (s *screen) wait(t *testing.T, want string) {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		s.mu.Lock()
		got, more := s.buf.String(), s.more
		s.mu.Unlock()
		if strings.Contains(got, want) {
			return
		}
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("the terminal does not show %q within a minute: %q", want, got)
		}
	}
}
