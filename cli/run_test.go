package cli_test

import (
	"bufio"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/cas"
)

func TestRunRefusesBadInput(t *testing.T) {
	root := shortRoot(t)
	for _, tc := range []struct {
		want []string
		args []string
	}{
		{[]string{"needs --fork-of WARM"}, []string{"run", "--", "true"}},
		{[]string{"no command given"}, []string{"run", "--fork-of", "warm"}},
		{[]string{"no command given"}, []string{"run", "--fork-of", "warm", "--"}},
		{[]string{"--count 0: want 1 to 4096"}, []string{"run", "--fork-of", "warm", "--count", "0", "--", "true"}},
		{[]string{"--count 5000: want 1 to 4096"}, []string{"run", "--fork-of", "warm", "--count", "5000", "true"}},
		{[]string{`--fork-of: box name "Warm"`}, []string{"run", "--fork-of", "Warm", "true"}},
		{[]string{`--copy-out "/root/x": want BOXPATH:HOSTPATH`}, []string{"run", "--fork-of", "warm", "--copy-out", "/root/x", "--", "true"}},
		{[]string{`--copy-out ":x": want BOXPATH:HOSTPATH`}, []string{"run", "--fork-of", "warm", "--copy-out", ":x", "--", "true"}},
		{[]string{`--copy-out "/:x": BOXPATH must name a file or folder`}, []string{"run", "--fork-of", "warm", "--copy-out", "/:x", "--", "true"}},
		{[]string{`HOSTPATH must hold {i}`}, []string{"run", "--fork-of", "warm", "--count", "2", "--copy-out", "/r:out", "--", "true"}},
		{[]string{`--env "1X=y"`}, []string{"run", "--fork-of", "warm", "--env", "1X=y", "--", "true"}},
		{[]string{`--env "NOVALUE"`}, []string{"run", "--fork-of", "warm", "--env", "NOVALUE", "--", "true"}},
		{[]string{"--timeout -1s: want a positive duration"}, []string{"run", "--fork-of", "warm", "--timeout=-1s", "--", "true"}},
		{[]string{"--promote", "needs --count 1"}, []string{"run", "--fork-of", "warm", "--promote", "--count", "2", "--", "true"}},
		{[]string{"--promote", "no --keep"}, []string{"run", "--fork-of", "warm", "--promote", "--keep", "--", "true"}},
		{[]string{`--name-prefix: box name "Job-1"`}, []string{"run", "--fork-of", "warm", "--name-prefix", "Job", "--", "true"}},
		{[]string{"-count"}, []string{"run", "--fork-of", "warm", "--count", "many", "--", "true"}},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			fails(t, 2, root, tc.want, tc.args...)
		})
	}
	// Valid arguments reach the daemon, which is not running; the flags
	// of the command in the box stay its own.
	fails(t, 8, root, []string{"boxd daemon is not running"}, "run", "--fork-of", "warm", "sh", "-c", "true", "--count", "x")
}

// TestRunQEMU runs boxd run against the real daemon with busybox boxes
// under QEMU: parallel jobs with logs, copy-out and {i}; prefixed output
// and --env; a missing copy-out; --keep-on-failure; --timeout; SIGINT;
// --promote. After each, no fork is left in the box list, in the process
// table or in the memory folder.
func TestRunQEMU(t *testing.T) {
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d := startDaemon(t, root)
	t.Cleanup(func() {
		for _, b := range boxNames(t, root) {
			run(t, root, "rm", b)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	key := writeKey(t)
	ok(t, root, "create", "warm", "--image", boxtest.Image, "--memory", "256M", "--runner", "qemu", "--ssh-key", key)
	// The project, checked out and built once.
	ok(t, root, "exec", "warm", "--", "sh", "-c", "mkdir -p /root/proj && echo built-once > /root/proj/state")
	memDir := filepath.Join("/dev/shm", "boxd-"+func() string { h := cas.Sum([]byte(root)); return hex.EncodeToString(h[:6]) }())
	// The warm box's spares start one after another: count once they
	// have stopped changing.
	qemuBefore := qemus(root)
	for stable, deadline := time.Now(), time.Now().Add(time.Minute); time.Since(stable) < 3*time.Second && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		if n := qemus(root); n != qemuBefore {
			qemuBefore, stable = n, time.Now()
		}
	}
	memBefore := memFiles(t, memDir)
	if len(memBefore) == 0 || qemuBefore == 0 {
		t.Fatalf("the warm box has %d memory files in %s and %d QEMU processes: the checks below would see nothing", len(memBefore), memDir, qemuBefore)
	}
	t.Logf("the warm box: %d QEMU processes, memory files %v", qemuBefore, memBefore)

	// nothingLeft checks that only want are boxes, and that no more QEMU
	// processes and memory files are left than the warm box had before
	// the runs (it gets its spares back after each fork; a fork's
	// snapshot may take a moment to reach the store and free its file).
	nothingLeft := func(t *testing.T, want ...string) {
		t.Helper()
		if got := boxNames(t, root); !slices.Equal(got, want) {
			t.Errorf("boxes after the run: %v, want %v", got, want)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			q, m := qemus(root), memFiles(t, memDir)
			if q <= qemuBefore && len(m) <= len(memBefore) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("after the run: %d QEMU processes (%d before), memory files %v (before %v)", q, qemuBefore, m, memBefore)
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	t.Run("jobs", func(t *testing.T) {
		out := t.TempDir()
		logs := filepath.Join(out, "logs")
		start := time.Now()
		r := run(t, root, "run", "--fork-of", "warm", "--count", "3", "--name-prefix", "job", "--logs", logs, "--json",
			"--copy-out", "/root/report.txt:"+filepath.Join(out, "report-{i}.txt"),
			"--copy-out", "/root/out:"+filepath.Join(out, "out-{i}"),
			"--", "sh", "-c", `echo "shard {i} of $(cat /root/proj/state)"; echo "report {i}" > /root/report.txt;
				mkdir -p /root/out/sub; echo deep-{i} > /root/out/sub/f; ln -s /etc/passwd /root/out/link; [ {i} != 2 ]`)
		t.Logf("3 jobs in %s", time.Since(start).Round(time.Millisecond))
		if r.code != 1 {
			t.Fatalf("exit %d, want 1 (fork 2's status)\n%v", r.code, r)
		}
		var res struct {
			ExitCode int `json:"exit_code"`
			Forks    []struct {
				Index    int      `json:"index"`
				Name     string   `json:"name"`
				ExitCode int      `json:"exit_code"`
				Log      string   `json:"log"`
				Copied   []string `json:"copied"`
				Kept     bool     `json:"kept"`
			} `json:"forks"`
		}
		decodeJSON(t, r.stdout, &res)
		if res.ExitCode != 1 || len(res.Forks) != 3 {
			t.Fatalf("--json: %+v", res)
		}
		for i, f := range res.Forks {
			n := i + 1
			want := map[int]int{1: 0, 2: 1, 3: 0}[n]
			if f.Index != n || f.Name != "job-"+string(rune('0'+n)) || f.ExitCode != want || f.Kept || len(f.Copied) != 2 {
				t.Errorf("fork %d: %+v", n, f)
			}
			if f.Log != filepath.Join(logs, string(rune('0'+n))+".log") {
				t.Errorf("fork %d's log %q", n, f.Log)
			}
			if b, err := os.ReadFile(f.Log); err != nil || string(b) != "shard "+string(rune('0'+n))+" of built-once\n" {
				t.Errorf("fork %d's log: %q, %v", n, b, err)
			}
			if b, err := os.ReadFile(filepath.Join(out, "report-"+string(rune('0'+n))+".txt")); err != nil || string(b) != "report "+string(rune('0'+n))+"\n" {
				t.Errorf("fork %d's report: %q, %v", n, b, err)
			}
			if b, err := os.ReadFile(filepath.Join(out, "out-"+string(rune('0'+n)), "sub", "f")); err != nil || string(b) != "deep-"+string(rune('0'+n))+"\n" {
				t.Errorf("fork %d's folder: %q, %v", n, b, err)
			}
			if _, err := os.Lstat(filepath.Join(out, "out-"+string(rune('0'+n)), "link")); err == nil {
				t.Errorf("fork %d's symbolic link was copied out", n)
			}
		}
		nothingLeft(t, "warm")
	})

	t.Run("prefixed output and env", func(t *testing.T) {
		r := run(t, root, "run", "--fork-of", "warm", "--count", "2", "--name-prefix", "pre", "--env", "GREETING=hi-{i},all",
			"--", "sh", "-c", `echo "$GREETING from {i}"; echo err-{i} >&2`)
		if r.code != 0 {
			t.Fatalf("%v", r)
		}
		for _, want := range []string{"pre-1 | hi-1,all from 1\n", "pre-2 | hi-2,all from 2\n"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("stdout %q lacks %q", r.stdout, want)
			}
		}
		if !strings.Contains(r.stderr, "pre-2 | err-2\n") || !strings.Contains(r.stderr, "boxd run: fork 1 (pre-1): exit 0") {
			t.Errorf("stderr %q", r.stderr)
		}
		nothingLeft(t, "warm")
	})

	t.Run("missing copy-out", func(t *testing.T) {
		r := run(t, root, "run", "--fork-of", "warm", "--name-prefix", "miss", "--copy-out", "/root/nope:"+filepath.Join(t.TempDir(), "x"), "--", "echo", "done")
		if r.code != 1 || r.stdout != "done\n" || !strings.Contains(r.stderr, "copy-out /root/nope: no such file or folder in the box") {
			t.Errorf("%v", r)
		}
		nothingLeft(t, "warm")
	})

	t.Run("keep-on-failure", func(t *testing.T) {
		r := run(t, root, "run", "--fork-of", "warm", "--count", "2", "--name-prefix", "kof", "--keep-on-failure", "--", "sh", "-c", "[ {i} = 2 ] && exit 7; exit 0")
		if r.code != 7 {
			t.Fatalf("exit %d, want 7\n%v", r.code, r)
		}
		if got := boxNames(t, root); !slices.Equal(got, []string{"kof-2", "warm"}) {
			t.Errorf("boxes: %v, want the failed fork kept", got)
		}
		ok(t, root, "rm", "kof-2")
		nothingLeft(t, "warm")
	})

	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		r := run(t, root, "run", "--fork-of", "warm", "--name-prefix", "slow", "--timeout", "5s", "--", "sh", "-c", "echo started; sleep 600")
		if r.code != 124 || !strings.Contains(r.stdout, "started") || !strings.Contains(r.stderr, "--timeout 5s") {
			t.Errorf("%v", r)
		}
		if d := time.Since(start); d > 2*time.Minute {
			t.Errorf("the run took %s after a 5s timeout", d)
		}
		nothingLeft(t, "warm")
	})

	t.Run("SIGINT", func(t *testing.T) {
		cmd := command(root, "run", "--fork-of", "warm", "--count", "2", "--name-prefix", "sig", "--", "sh", "-c", "echo started; sleep 600")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := bufio.NewScanner(stdout)
		started := 0
		for started < 2 && lines.Scan() {
			if strings.HasSuffix(lines.Text(), "| started") {
				started++
			}
		}
		if started < 2 {
			_ = cmd.Process.Kill()
			t.Fatalf("the jobs did not start: %s", stderr.String())
		}
		if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		for lines.Scan() {
		}
		_ = cmd.Wait()
		if code := cmd.ProcessState.ExitCode(); code != 130 {
			t.Errorf("exit %d after SIGINT, want 130; stderr %q", code, stderr.String())
		}
		nothingLeft(t, "warm")
	})

	t.Run("name taken", func(t *testing.T) {
		ok(t, root, "fork", "warm", "taken-1")
		fails(t, 4, root, []string{`"taken-1"`, "already exists"}, "run", "--fork-of", "warm", "--name-prefix", "taken", "--", "true")
		if got := boxNames(t, root); !slices.Equal(got, []string{"taken-1", "warm"}) {
			t.Errorf("boxes: %v: a run whose fork was refused removed a box it did not make", got)
		}
		ok(t, root, "rm", "taken-1")
		fails(t, 3, root, []string{"--fork-of", `"nope"`}, "run", "--fork-of", "nope", "--", "true")
		nothingLeft(t, "warm")
	})

	t.Run("promote", func(t *testing.T) {
		r := run(t, root, "run", "--fork-of", "warm", "--name-prefix", "up", "--promote", "--", "sh", "-c", "echo updated > /root/proj/state")
		if r.code != 0 || !strings.Contains(r.stderr, "warm is now fork up-1's state; its previous state is snapshot box.warm.") {
			t.Fatalf("%v", r)
		}
		if r := ok(t, root, "exec", "warm", "--", "sh", "-c", "hostname; cat /root/proj/state"); r.stdout != "warm\nupdated\n" {
			t.Errorf("warm after the promote: %q", r.stdout)
		}
		if r := ok(t, root, "run", "--fork-of", "warm", "--name-prefix", "next", "--", "cat", "/root/proj/state"); r.stdout != "updated\n" {
			t.Errorf("the next run sees %q", r.stdout)
		}
		if r := ok(t, root, "snapshots", "warm"); !strings.Contains(r.stdout, "-promoted") {
			t.Errorf("the previous state is not among warm's snapshots:\n%s", r.stdout)
		}
		// A failed command promotes nothing.
		if r := run(t, root, "run", "--fork-of", "warm", "--name-prefix", "bad", "--promote", "--", "sh", "-c", "echo broken > /root/proj/state; exit 3"); r.code != 3 {
			t.Errorf("%v", r)
		}
		if r := ok(t, root, "exec", "warm", "cat", "/root/proj/state"); r.stdout != "updated\n" {
			t.Errorf("warm after a failed promote: %q", r.stdout)
		}
		nothingLeft(t, "warm")
	})
}

// boxNames lists the boxes of root's daemon, sorted.
func boxNames(t *testing.T, root string) []string {
	t.Helper()
	var boxes []struct{ Name string }
	decodeJSON(t, ok(t, root, "ls", "--json").stdout, &boxes)
	var names []string
	for _, b := range boxes {
		names = append(names, b.Name)
	}
	slices.Sort(names)
	return names
}

// qemus counts the QEMU processes of root's boxes.
func qemus(root string) int {
	n := 0
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), "qemu-system") && strings.Contains(string(b), root+"/") {
			n++
		}
	}
	return n
}

// memFiles lists the files in the daemon's memory folder.
func memFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, strings.TrimPrefix(p, dir))
		}
		return nil
	})
	return out
}
