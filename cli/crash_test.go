package cli_test

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
)

// crashes is how many times each crash test kills boxd.
const crashes = 10

// killed runs cmd and kills it with SIGKILL after delay unless it has
// finished. It reports whether it was killed; any other failure fails the
// test.
func killed(t *testing.T, cmd *exec.Cmd, delay time.Duration) bool {
	t.Helper()
	var out []byte
	cmd.Stdout = io.Discard
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(delay, func() { _ = cmd.Process.Kill() })
	out, _ = io.ReadAll(stderr)
	err = cmd.Wait()
	timer.Stop()
	if err == nil {
		return false
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, isWS := ee.Sys().(syscall.WaitStatus); isWS && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	t.Fatalf("%v: %v\n%s", cmd.Args, err, out)
	return false
}

// timed runs boxd to completion and returns how long it took.
func timed(t *testing.T, root string, args ...string) time.Duration {
	t.Helper()
	start := time.Now()
	ok(t, root, args...)
	return time.Since(start)
}

// TestCrashIngest kills `store ingest` at random points: each time the
// store reopens, holds the snapshot whole or not at all, and verifies.
func TestCrashIngest(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	file := filepath.Join(dir, "img")
	// ~64 MiB: 40 MiB of random data in 1 MiB runs, zeros between, so that
	// an ingest seals a pack on the way.
	const size = 64 << 20
	newImage := func() { image(t, file, size, 5<<20/8, 1<<20) }

	// How long one whole ingest takes picks the range of kill points.
	newImage()
	full := timed(t, filepath.Join(dir, "scratch"), "store", "ingest", "--name", "timing", file)
	if err := os.RemoveAll(filepath.Join(dir, "scratch")); err != nil {
		t.Fatal(err)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("one ingest takes %v; kill points seeded with %d", full, seed)
	r := rand.New(rand.NewPCG(seed, 1))

	var complete []string
	type content struct {
		sum  [32]byte
		size int64
	}
	sums := map[string]content{} // what each complete snapshot holds
	var wasKilled int
	for i := range crashes {
		newImage() // fresh data: nothing dedups against earlier attempts
		name := fmt.Sprintf("snap-%d", i)
		delay := time.Duration(r.Int64N(int64(full) + 1))
		k := killed(t, command(root, "store", "ingest", "--name", name, file), delay)
		if k {
			wasKilled++
		}
		got := names(list(t, root))
		// Reopening the store removed the pack the killed run was writing.
		if tmp, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "*.tmp")); len(tmp) > 0 {
			t.Errorf("unfinished packs left after reopening: %v", tmp)
		}
		want := complete
		if slices.Contains(got, name) {
			want = append(slices.Clone(complete), name)
		} else if !k {
			t.Fatalf("ingest of %s finished but the snapshot is missing", name)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("after killing the ingest of %s at %v: store holds %v, want %v", name, delay, got, want)
		}
		present := len(want) > len(complete)
		if present {
			checkExport(t, root, name, file)
			sum, n := hashFile(t, file)
			sums[name] = content{sum, n}
			complete = want
		}
		ok(t, root, "store", "verify")
		t.Logf("kill %d at %v: killed %v, snapshot present %v", i, delay, k, present)
	}
	t.Logf("%d of %d runs were killed before finishing", wasKilled, crashes)
	// Every complete snapshot still exports as it was ingested, after a
	// collection of whatever the killed runs left.
	ok(t, root, "store", "gc")
	ok(t, root, "store", "verify")
	for _, name := range complete {
		out := filepath.Join(dir, "out.img")
		ok(t, root, "store", "export", name, out)
		if sum, n := hashFile(t, out); sums[name] != (content{sum, n}) {
			t.Errorf("after gc, %s exports differently", name)
		}
	}
}

// TestCrashGC kills `store gc` at random points over a store with garbage
// to delete and packs to rewrite: each time the remaining snapshots export
// as they were and the store verifies; a later gc finishes the work.
func TestCrashGC(t *testing.T) {
	dir := t.TempDir()
	template := filepath.Join(dir, "template")
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o700); err != nil {
		t.Fatal(err)
	}
	// big holds keep's data and more: removing big leaves its pack mostly
	// garbage, so gc rewrites it, moving keep's chunks.
	keepFile := randomFile(t, filepath.Join(src, "keep"), 6<<20)
	bigFile := filepath.Join(src, "big")
	concat(t, bigFile, keepFile, randomFile(t, filepath.Join(dir, "rest"), 10<<20))
	otherFile := image(t, filepath.Join(src, "other"), 12<<20, 256<<10, 512<<10)
	otherChild := modified(t, otherFile, filepath.Join(dir, "other-child"), 400)
	ok(t, template, "store", "ingest", "--name", "big", bigFile)
	ok(t, template, "store", "ingest", "--name", "keep", keepFile)
	ok(t, template, "store", "ingest", "--name", "other", otherFile)
	ok(t, template, "store", "ingest", "--name", "other-child", "--parent", "other", otherChild)
	ok(t, template, "store", "ingest", "--name", "big-child", "--parent", "big", modified(t, bigFile, filepath.Join(dir, "big-child"), 50))
	for _, n := range []string{"big-child", "big", "other-child"} {
		ok(t, template, "store", "rm", n)
	}
	kept := []string{"keep", "other"}

	scratch := filepath.Join(dir, "scratch")
	copyTree(t, template, scratch)
	full := timed(t, scratch, "store", "gc")
	checkGCDone(t, scratch)
	if err := os.RemoveAll(scratch); err != nil {
		t.Fatal(err)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("one gc takes %v; kill points seeded with %d", full, seed)
	r := rand.New(rand.NewPCG(seed, 2))

	for i := range crashes {
		root := filepath.Join(dir, fmt.Sprintf("root-%d", i))
		copyTree(t, template, root)
		delay := time.Duration(r.Int64N(int64(full) + 1))
		k := killed(t, command(root, "store", "gc"), delay)
		t.Logf("kill %d at %v: killed %v", i, delay, k)
		if got := names(list(t, root)); !slices.Equal(got, kept) {
			t.Fatalf("after killing gc: store holds %v, want %v", got, kept)
		}
		for _, n := range kept {
			checkExport(t, root, n, filepath.Join(src, n))
		}
		ok(t, root, "store", "verify")
		// A gc run to the end finishes what the killed one began.
		ok(t, root, "store", "gc")
		checkGCDone(t, root)
		ok(t, root, "store", "verify")
		for _, n := range kept {
			checkExport(t, root, n, filepath.Join(src, n))
		}
		if err := os.RemoveAll(root); err != nil {
			t.Fatal(err)
		}
	}
}

// checkGCDone checks that no garbage is left in the store.
func checkGCDone(t *testing.T, root string) {
	t.Helper()
	var rep struct {
		Store struct {
			GarbageBytes     int64 `json:"garbage_bytes"`
			GarbageChunks    int64 `json:"garbage_chunks"`
			ReclaimableBytes int64 `json:"reclaimable_bytes"`
		} `json:"store"`
	}
	decodeJSON(t, ok(t, root, "store", "report", "--json").stdout, &rep)
	if rep.Store.GarbageBytes != 0 || rep.Store.GarbageChunks != 0 || rep.Store.ReclaimableBytes != 0 {
		t.Errorf("after gc: %+v", rep.Store)
	}
}

// concat writes the files srcs, one after another, to dst.
func concat(t *testing.T, dst string, srcs ...string) {
	t.Helper()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	for _, s := range srcs {
		in, err := os.Open(s)
		if err != nil {
			t.Fatal(err)
		}
		_, err = io.Copy(out, in)
		in.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// copyTree copies the folder src to dst.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		to := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		in, err := os.Open(path)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		return out.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
}
