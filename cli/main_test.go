package cli_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// boxd is the path of the boxd binary under test, built once by TestMain.
var boxd string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "boxd-cli-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// go test puts its own go command first in PATH.
	goTool, err := exec.LookPath("go")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	boxd = filepath.Join(dir, "boxd")
	build := exec.Command(goTool, "build", "-o", boxd, "../cmd/boxd")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "building boxd: %v\n", err)
		return 1
	}
	return m.Run()
}

// result is what one run of boxd did.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// command returns boxd with args, run against root.
func command(root string, args ...string) *exec.Cmd {
	cmd := exec.Command(boxd, append([]string{"--root", root}, args...)...)
	cmd.Env = append(os.Environ(), "BOXD_ROOT=")
	return cmd
}

// run runs boxd against root and returns what it did.
func run(t testing.TB, root string, args ...string) result {
	t.Helper()
	cmd := command(root, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("running boxd %s: %v", strings.Join(args, " "), err)
		}
		code = ee.ExitCode()
	}
	return result{code, stdout.String(), stderr.String()}
}

// ok runs boxd and fails the test unless it succeeds.
func ok(t testing.TB, root string, args ...string) result {
	t.Helper()
	r := run(t, root, args...)
	if r.code != 0 {
		t.Fatalf("boxd %s: %v", strings.Join(args, " "), r)
	}
	return r
}

// fails runs boxd and checks that it exits with code and says why in one
// line on stderr (containing each of want) and nothing on stdout.
func fails(t testing.TB, code int, root string, want []string, args ...string) result {
	t.Helper()
	r := run(t, root, args...)
	if r.code != code {
		t.Fatalf("boxd %s: exit %d, want %d\n%v", strings.Join(args, " "), r.code, code, r)
	}
	checkErrLine(t, r.stderr, want...)
	if r.stdout != "" {
		t.Errorf("boxd %s: failure printed on stdout: %q", strings.Join(args, " "), r.stdout)
	}
	return r
}

// checkErrLine checks that stderr is one line starting "boxd: " that
// contains each of want.
func checkErrLine(t testing.TB, stderr string, want ...string) {
	t.Helper()
	if !strings.HasPrefix(stderr, "boxd: ") || !strings.HasSuffix(stderr, "\n") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("stderr is not one line starting \"boxd: \": %q", stderr)
	}
	for _, w := range want {
		if !strings.Contains(stderr, w) {
			t.Errorf("stderr %q does not mention %q", stderr, w)
		}
	}
}

// decodeJSON parses out as exactly one JSON value.
func decodeJSON(t testing.TB, out string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(out))
	if err := dec.Decode(v); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, out)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		t.Fatalf("output holds more than one JSON value: %s", out)
	}
}

// snapshot is the part of `store ls --json` the tests read.
type snapshot struct {
	Name   string `json:"name"`
	Parent string `json:"parent"`
	Maps   []struct {
		Name string `json:"name"`
		Kind string `json:"kind"`
		Size int64  `json:"size"`
	} `json:"maps"`
}

// list returns the snapshots `store ls --json` prints.
func list(t testing.TB, root string) []snapshot {
	t.Helper()
	var snaps []snapshot
	decodeJSON(t, ok(t, root, "store", "ls", "--json").stdout, &snaps)
	return snaps
}

// names returns the snapshot names in order.
func names(snaps []snapshot) []string {
	var out []string
	for _, s := range snaps {
		out = append(out, s.Name)
	}
	return out
}

// hashFile returns the SHA-256 of a file's content and its size.
func hashFile(t testing.TB, path string) ([32]byte, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil)), n
}

// checkExport exports snapshot name and compares it with the file src.
func checkExport(t testing.TB, root, name, src string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), name+".img")
	ok(t, root, "store", "export", name, out)
	wantSum, wantSize := hashFile(t, src)
	gotSum, gotSize := hashFile(t, out)
	if gotSum != wantSum || gotSize != wantSize {
		t.Fatalf("export of %s (%d bytes) differs from %s (%d bytes)", name, gotSize, src, wantSize)
	}
	_ = os.Remove(out)
}

// urandom is the system's random source: filling files from it costs the
// test process nothing, even under the race detector.
func urandom(t testing.TB) *os.File {
	t.Helper()
	f, err := os.Open("/dev/urandom")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// image writes a file of size bytes: random runs of runLen bytes every
// period bytes, holes (zeros) between them.
func image(t testing.TB, path string, size, runLen, period int64) string {
	t.Helper()
	if runLen > period {
		t.Fatalf("run %d longer than period %d", runLen, period)
	}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	src := urandom(t)
	for off := int64(0); off < size; off += period {
		n := min(runLen, size-off)
		if _, err := f.Seek(off, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		if _, err := io.CopyN(f, src, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// randomFile writes size random bytes to path.
func randomFile(t testing.TB, path string, size int64) string {
	t.Helper()
	return image(t, path, size, size, size+1)
}

// modified copies src to dst with count 4 KiB blocks, spread out, made
// random.
func modified(t testing.TB, src, dst string, count int) string {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	blocks := (len(data) + 4095) / 4096
	buf := make([]byte, 4096)
	for i := range count {
		n := (i*7919 + 13) % blocks
		if _, err := io.ReadFull(urandom(t), buf); err != nil {
			t.Fatal(err)
		}
		copy(data[n*4096:min((n+1)*4096, len(data))], buf)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return dst
}
