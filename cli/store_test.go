package cli_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// The exit codes of the categories, from errcat's table.
var (
	exitInvalid      = errcat.ExitCode(errdefs.ErrInvalidArgument)
	exitNotFound     = errcat.ExitCode(errdefs.ErrNotFound)
	exitExists       = errcat.ExitCode(errdefs.ErrAlreadyExists)
	exitPrecondition = errcat.ExitCode(errdefs.ErrFailedPrecondition)
	exitCorrupt      = errcat.ExitCode(errdefs.ErrDataLoss)
	exitNoSpace      = errcat.ExitCode(errdefs.ErrResourceExhausted)
	exitBusy         = errcat.ExitCode(errdefs.ErrUnavailable)
)

// newStore returns a root holding base, child (over base) and vm (over
// base, with a memory map beside the inherited disk), and base's file.
func newStore(t *testing.T) (root, baseFile string) {
	t.Helper()
	dir := t.TempDir()
	root = filepath.Join(dir, "root")
	baseFile = image(t, filepath.Join(dir, "base.img"), 300<<10+123, 64<<10, 96<<10)
	childFile := modified(t, baseFile, filepath.Join(dir, "child.img"), 5)
	memFile := randomFile(t, filepath.Join(dir, "mem.img"), 64<<10)
	ok(t, root, "store", "ingest", "--name", "base", baseFile)
	ok(t, root, "store", "ingest", "--name", "child", "--parent", "base", childFile)
	ok(t, root, "store", "ingest", "--name", "vm", "--parent", "base", "--kind", "memory", memFile)
	return root, baseFile
}

func TestBadInput(t *testing.T) {
	root, file := newStore(t)
	dir := t.TempDir()
	out := filepath.Join(dir, "out.img")
	tests := []struct {
		name string
		code int
		want []string // words stderr must contain
		args []string
	}{
		{"missing file", exitNotFound, []string{"nope.img"}, []string{"store", "ingest", "--name", "x", filepath.Join(dir, "nope.img")}},
		{"existing name", exitExists, []string{"base", "already exists"}, []string{"store", "ingest", "--name", "base", file}},
		{"unknown parent", exitNotFound, []string{"ghost"}, []string{"store", "ingest", "--name", "x", "--parent", "ghost", file}},
		{"empty name", exitInvalid, []string{"invalid name"}, []string{"store", "ingest", "--name", "", file}},
		{"long name", exitInvalid, []string{"invalid name"}, []string{"store", "ingest", "--name", strings.Repeat("n", 129), file}},
		{"name with slash", exitInvalid, []string{"a/b"}, []string{"store", "ingest", "--name", "a/b", file}},
		{"dot dot", exitInvalid, []string{`".."`}, []string{"store", "ingest", "--name", "..", file}},
		{"name with space", exitInvalid, []string{"invalid name"}, []string{"store", "ingest", "--name", "a b", file}},
		{"missing name", exitInvalid, []string{"--name"}, []string{"store", "ingest", file}},
		{"unknown kind", exitInvalid, []string{"swap"}, []string{"store", "ingest", "--name", "x", "--kind", "swap", file}},
		{"ingest a folder", exitInvalid, []string{"folder"}, []string{"store", "ingest", "--name", "x", dir}},
		{"ingest without file", exitInvalid, []string{"usage"}, []string{"store", "ingest", "--name", "x"}},
		{"ingest two files", exitInvalid, []string{"usage"}, []string{"store", "ingest", "--name", "x", file, file}},
		{"export one arg", exitInvalid, []string{"usage"}, []string{"store", "export", "base"}},
		{"export three args", exitInvalid, []string{"usage"}, []string{"store", "export", "base", out, out}},
		{"rm no args", exitInvalid, []string{"usage"}, []string{"store", "rm"}},
		{"rm two args", exitInvalid, []string{"usage"}, []string{"store", "rm", "child", "vm"}},
		{"ls with args", exitInvalid, []string{"usage"}, []string{"store", "ls", "base"}},
		{"gc with args", exitInvalid, []string{"usage"}, []string{"store", "gc", "now"}},
		{"verify with args", exitInvalid, []string{"usage"}, []string{"store", "verify", "all"}},
		{"gc threshold zero", exitInvalid, []string{"threshold"}, []string{"store", "gc", "--threshold", "0"}},
		{"gc threshold above one", exitInvalid, []string{"threshold"}, []string{"store", "gc", "--threshold", "1.5"}},
		{"unknown flag", exitInvalid, []string{"-frobnicate"}, []string{"store", "ls", "--frobnicate"}},
		{"unknown global flag", exitInvalid, []string{"-frobnicate"}, []string{"--frobnicate", "store", "ls"}},
		{"unknown command", exitInvalid, []string{"frob"}, []string{"store", "frob"}},
		{"rm with children", exitPrecondition, []string{"base", "child", "vm"}, []string{"store", "rm", "base"}},
		{"rm unknown", exitNotFound, []string{"ghost"}, []string{"store", "rm", "ghost"}},
		{"export unknown", exitNotFound, []string{"ghost"}, []string{"store", "export", "ghost", out}},
		{"export to a folder", exitInvalid, []string{"folder"}, []string{"store", "export", "base", dir}},
		{"export into a missing folder", exitNotFound, []string{"output folder"}, []string{"store", "export", "base", filepath.Join(dir, "no", "out.img")}},
		{"export of two maps", exitInvalid, []string{"--map", "disk", "memory"}, []string{"store", "export", "vm", out}},
		{"export unknown map", exitNotFound, []string{"swap"}, []string{"store", "export", "--map", "swap", "vm", out}},
		{"report unknown", exitNotFound, []string{"ghost"}, []string{"store", "report", "base", "ghost"}},
		{"empty root", exitInvalid, []string{"--root"}, []string{"--root", "", "store", "ls"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fails(t, tc.code, root, tc.want, tc.args...)
		})
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed export left %s behind", out)
	}
	// Nothing changed.
	if got := names(list(t, root)); !slices.Equal(got, []string{"base", "child", "vm"}) {
		t.Fatalf("after the failures the store holds %v", got)
	}
	ok(t, root, "store", "verify")
	checkExport(t, root, "base", file)
}

// TestExportMaps exports each map of a snapshot with two.
func TestExportMaps(t *testing.T) {
	root, base := newStore(t)
	dir := t.TempDir()
	mem := randomFile(t, filepath.Join(dir, "mem2.img"), 12345)
	ok(t, root, "store", "ingest", "--name", "vm2", "--parent", "vm", "--kind", "memory", mem)
	for m, src := range map[string]string{"disk": base, "memory": mem} {
		out := filepath.Join(dir, m+".out")
		ok(t, root, "store", "export", "--map", m, "vm2", out)
		gotSum, _ := hashFile(t, out)
		wantSum, _ := hashFile(t, src)
		if gotSum != wantSum {
			t.Errorf("map %s of vm2 differs from its source", m)
		}
	}
	// Ingest from stdin.
	cmd := command(root, "store", "ingest", "--name", "piped", "-")
	in, err := os.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	cmd.Stdin = in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ingest from stdin: %v\n%s", err, out)
	}
	checkExport(t, root, "piped", base)
}

func TestUnwritableRoot(t *testing.T) {
	dir := t.TempDir()
	file := randomFile(t, filepath.Join(dir, "f"), 5000)
	for _, args := range [][]string{{"store", "ls"}, {"store", "ingest", "--name", "x", file}, {"store", "verify"}} {
		fails(t, errcat.ExitFailure, filepath.Join(file, "root"), []string{"not a directory"}, args...)
	}

	ro := filepath.Join(dir, "ro")
	if err := os.Mkdir(ro, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.MountTmpfs(t, ro, "ro")
	for _, root := range []string{ro, filepath.Join(ro, "sub")} {
		for _, args := range [][]string{{"store", "ls"}, {"store", "ingest", "--name", "x", file}, {"store", "gc"}} {
			fails(t, errcat.ExitFailure, root, []string{"read-only file system"}, args...)
		}
	}
}

func TestRootBusy(t *testing.T) {
	root, _ := newStore(t)
	g, err := snapshotter.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	fails(t, exitBusy, root, []string{"in use"}, "store", "ls")
}

func TestVerifyCorrupt(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	file := randomFile(t, filepath.Join(dir, "a.img"), 64<<10)
	ok(t, root, "store", "ingest", "--name", "a", file)
	ok(t, root, "store", "verify")

	packs, err := filepath.Glob(filepath.Join(root, "cas", "packs", "*.pack"))
	if err != nil || len(packs) != 1 {
		t.Fatalf("packs: %v, %v", packs, err)
	}
	data, err := os.ReadFile(packs[0])
	if err != nil {
		t.Fatal(err)
	}
	entries, err := cas.DecodeFooter(data, int64(len(data)))
	if err != nil || len(entries) != 16 {
		t.Fatalf("footer: %d entries, %v", len(entries), err)
	}
	e := entries[5]
	if e.Offset < 16 {
		t.Fatalf("chunk at %d lies in the pack header", e.Offset)
	}
	data[e.Offset+e.Stored/2] ^= 0x40
	if err := os.WriteFile(packs[0], data, 0o600); err != nil {
		t.Fatal(err)
	}

	r := run(t, root, "store", "verify")
	if r.code != exitCorrupt {
		t.Fatalf("verify of a damaged pack: %v", r)
	}
	checkErrLine(t, r.stderr, "verify found 1 damaged")
	if !strings.Contains(r.stdout, "damaged: ") || !strings.Contains(r.stdout, e.ID.String()) {
		t.Errorf("verify does not name the damaged chunk on stdout: %q", r.stdout)
	}
	r = run(t, root, "--json", "store", "verify")
	if r.code != exitCorrupt {
		t.Fatalf("verify --json of a damaged pack: %v", r)
	}
	var res struct {
		Damaged []struct {
			Pack, Chunk string
		} `json:"damaged"`
		Problems []struct {
			Snapshot, Chunk string
		} `json:"problems"`
	}
	decodeJSON(t, r.stdout, &res)
	if len(res.Damaged) != 1 || res.Damaged[0].Chunk != e.ID.String() || len(res.Problems) != 1 || res.Problems[0].Snapshot != "a" {
		t.Errorf("verify --json: %+v", res)
	}
	// Reading the damaged block fails its hash: no wrong bytes are written.
	out := filepath.Join(dir, "out.img")
	fails(t, exitCorrupt, root, []string{"damaged"}, "store", "export", "a", out)
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed export left %s behind", out)
	}
}

func TestDiskFull(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	testutil.MountTmpfs(t, root, "size=8m")
	big := randomFile(t, filepath.Join(dir, "big.img"), 32<<20)
	fails(t, exitNoSpace, root, []string{"no space left"}, "store", "ingest", "--name", "big", big)
	if snaps := list(t, root); len(snaps) != 0 {
		t.Fatalf("a failed ingest left snapshots: %v", names(snaps))
	}
	ok(t, root, "store", "verify")
	// The store is still usable: the partial pack is gone.
	small := randomFile(t, filepath.Join(dir, "small.img"), 1<<20)
	ok(t, root, "store", "ingest", "--name", "small", small)
	checkExport(t, root, "small", small)
	ok(t, root, "store", "verify")

	// The disk fills up while the snapshot's record is written: an image
	// made only of chunks already stored needs no pack, only metadata.
	twice := filepath.Join(dir, "twice.img")
	concat(t, twice, small, small, small)
	filler := fill(t, filepath.Join(root, "filler"))
	fails(t, exitNoSpace, root, []string{"no space left"}, "store", "ingest", "--name", "twice", twice)
	if got := names(list(t, root)); !slices.Equal(got, []string{"small"}) {
		t.Fatalf("after a failed commit the store holds %v", got)
	}
	ok(t, root, "store", "verify")
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	ok(t, root, "store", "ingest", "--name", "twice", twice)
	checkExport(t, root, "twice", twice)
	ok(t, root, "store", "verify")
}

// fill writes path until its file system is full.
func fill(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{1}, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return path
		}
	}
}

// TestRoundTrip ingests, exports, reports, removes and collects through
// the command line, in text form.
func TestRoundTrip(t *testing.T) {
	root, base := newStore(t)
	checkExport(t, root, "base", base)
	r := ok(t, root, "store", "ls")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "NAME") || !strings.HasPrefix(lines[1], "base ") {
		t.Fatalf("store ls:\n%s", r.stdout)
	}
	r = ok(t, root, "store", "report")
	for _, w := range []string{"3 snapshots", "dedup", "reference counts", "exclusive"} {
		if !strings.Contains(strings.ToLower(r.stdout), w) {
			t.Errorf("report lacks %q:\n%s", w, r.stdout)
		}
	}
	if r.stderr != "" {
		t.Errorf("report wrote to stderr: %q", r.stderr)
	}
	ok(t, root, "store", "rm", "child")
	ok(t, root, "store", "rm", "vm")
	ok(t, root, "store", "rm", "base")
	ok(t, root, "store", "gc")
	var rep struct {
		Snapshots int `json:"snapshots"`
		Store     struct {
			Packs        int   `json:"packs"`
			IndexEntries int64 `json:"index_entries"`
		} `json:"store"`
	}
	decodeJSON(t, ok(t, root, "store", "report", "--json").stdout, &rep)
	if rep.Snapshots != 0 || rep.Store.Packs != 0 || rep.Store.IndexEntries != 0 {
		t.Fatalf("after removing everything and gc: %+v", rep)
	}
	ok(t, root, "store", "verify")
}
