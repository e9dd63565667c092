package cli_test

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// textFile writes size bytes of compressible text, unique to seed, to path.
func textFile(t *testing.T, path string, size int, seed uint64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(f)
	r := rand.New(rand.NewPCG(seed, 3))
	for n := 0; n < size; {
		k, err := fmt.Fprintf(w, "line %d of file %d: the value is %d\n", n, seed, r.IntN(1000))
		if err != nil {
			t.Fatal(err)
		}
		n += k
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCrashCompact kills `store compact` at random points over a store of
// several packs: each time every snapshot exports as it was and the store
// verifies; a later compact finishes the work, and gc drops what the
// killed one left behind.
func TestCrashCompact(t *testing.T) {
	dir := t.TempDir()
	template := filepath.Join(dir, "template")
	var names []string
	files := map[string]string{}
	for i := range 4 {
		name := fmt.Sprintf("snap-%d", i)
		files[name] = textFile(t, filepath.Join(dir, name), 12<<20, uint64(i))
		ok(t, template, "store", "ingest", "--name", name, files[name])
		names = append(names, name)
	}
	scratch := filepath.Join(dir, "scratch")
	copyTree(t, template, scratch)
	full := timed(t, scratch, "store", "compact")
	if err := os.RemoveAll(scratch); err != nil {
		t.Fatal(err)
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("one compact takes %v; kill points seeded with %d", full, seed)
	r := rand.New(rand.NewPCG(seed, 4))
	for i := range crashes {
		root := filepath.Join(dir, fmt.Sprintf("root-%d", i))
		copyTree(t, template, root)
		delay := time.Duration(r.Int64N(int64(full) + 1))
		k := killed(t, command(root, "store", "compact"), delay)
		t.Logf("kill %d at %v: killed %v", i, delay, k)
		for _, n := range names {
			checkExport(t, root, n, files[n])
		}
		ok(t, root, "store", "verify")
		ok(t, root, "store", "compact")
		ok(t, root, "store", "gc")
		ok(t, root, "store", "verify")
		for _, n := range names {
			checkExport(t, root, n, files[n])
		}
		if err := os.RemoveAll(root); err != nil {
			t.Fatal(err)
		}
	}
}
