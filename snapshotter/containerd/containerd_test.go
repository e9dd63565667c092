package containerd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the images are mounted with loop devices")
	}
}

// open opens a graph under root/store and a snapshotter under
// root/containerd; cleanup closes both.
func open(root string, opts ...Opt) (*Snapshotter, *snapshotter.Graph, func() error, error) {
	g, err := snapshotter.Open(filepath.Join(root, "store"))
	if err != nil {
		return nil, nil, nil, err
	}
	sn, err := NewSnapshotter(filepath.Join(root, "containerd"), g, opts...)
	if err != nil {
		g.Close()
		return nil, nil, nil, err
	}
	s := sn.(*Snapshotter)
	return s, g, func() error {
		err := s.Close()
		if gerr := g.Close(); err == nil {
			err = gerr
		}
		return err
	}, nil
}

// TestContainerdSuite runs containerd's own snapshotter suite.
func TestContainerdSuite(t *testing.T) {
	requireRoot(t)
	testsuite.SnapshotterSuite(t, "boxd", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		s, _, cleanup, err := open(root)
		if err != nil {
			return nil, nil, err
		}
		return s, cleanup, nil
	})
}

// newSnapshotter opens a snapshotter in a fresh folder, closed at cleanup.
func newSnapshotter(t *testing.T, opts ...Opt) (*Snapshotter, *snapshotter.Graph, string) {
	t.Helper()
	root := t.TempDir()
	s, g, cleanup, err := open(root, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cleanup() })
	return s, g, root
}

// withMounted mounts ms on a temporary folder, calls fn with it, and
// unmounts.
func withMounted(t *testing.T, ms []mount.Mount, fn func(dir string) error) {
	t.Helper()
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatalf("mounting %+v: %v", ms, err)
	}
	err := fn(dir)
	if uerr := mount.UnmountAll(dir, 0); uerr != nil {
		t.Fatalf("unmounting %s: %v", dir, uerr)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// randomData returns n bytes of incompressible data from seed.
func randomData(seed uint64, n int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, n)
	_, _ = rand.NewChaCha8(key).Read(b)
	return b
}

// writeFiles mounts an active snapshot and writes files into it.
func writeFiles(t *testing.T, ms []mount.Mount, files map[string][]byte) {
	t.Helper()
	withMounted(t, ms, func(dir string) error {
		for name, data := range files {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				return err
			}
		}
		return nil
	})
}

// checkFiles mounts ms and checks that it holds exactly files.
func checkFiles(t *testing.T, ms []mount.Mount, files map[string][]byte) {
	t.Helper()
	withMounted(t, ms, func(dir string) error {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		if len(entries) != len(files) {
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			return fmt.Errorf("%s holds %v, want %d files", dir, names, len(files))
		}
		for name, want := range files {
			got, err := os.ReadFile(filepath.Join(dir, name))
			if err != nil {
				return err
			}
			if !bytes.Equal(got, want) {
				return fmt.Errorf("%s: %d bytes differ from the %d written", name, len(got), len(want))
			}
		}
		return nil
	})
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func graphInfo(t *testing.T, g *snapshotter.Graph, name string) snapshotter.MapInfo {
	t.Helper()
	snap, err := g.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	m, ok := snap.Map(MapName)
	if !ok {
		t.Fatalf("graph snapshot %s has no %s map", name, MapName)
	}
	return m
}

func sizeLabel(n int64) snapshots.Opt {
	return snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: strconv.FormatInt(n, 10)})
}

// TestSparseDeltaDedup: images are sparse, commits store deltas, and blocks
// the store holds are not stored again.
func TestSparseDeltaDedup(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, g, _ := newSnapshotter(t)

	const size = 256 << 20
	ms, err := s.Prepare(ctx, "base-a", "", sizeLabel(size))
	if err != nil {
		t.Fatal(err)
	}
	img := ms[0].Source
	if st, err := os.Stat(img); err != nil || st.Size() != size {
		t.Fatalf("fresh image: %v, size %d, want %d", err, st.Size(), size)
	}
	if a := allocated(t, img); a > 2<<20 {
		t.Errorf("a fresh %d-byte image takes %d bytes; want it sparse", size, a)
	}
	file8 := randomData(1, 8<<20)
	writeFiles(t, ms, map[string][]byte{"eight": file8})
	if err := s.Commit(ctx, "base", "base-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the committed image is still there: %v", err)
	}
	bi, err := s.Stat(ctx, "base")
	if err != nil {
		t.Fatal(err)
	}
	baseID, _, _, _ := statID(t, s, "base")
	baseMap := graphInfo(t, g, s.graphName(baseID))
	if baseMap.Size != size || bi.Kind != snapshots.KindCommitted {
		t.Fatalf("graph map size %d, kind %v", baseMap.Size, bi.Kind)
	}

	// A child image is the parent's non-zero blocks, the rest holes.
	ms, err = s.Prepare(ctx, "child-a", "base")
	if err != nil {
		t.Fatal(err)
	}
	if a := allocated(t, ms[0].Source); a < 8<<20 || a > 11<<20 {
		t.Errorf("the child image takes %d bytes; want the parent's 8 MiB file and metadata", a)
	}
	u, err := s.Usage(ctx, "child-a")
	if err != nil || u.Size != 0 {
		t.Errorf("usage of an untouched child: %+v, %v; want 0", u, err)
	}
	file1 := randomData(2, 1<<20)
	writeFiles(t, ms, map[string][]byte{"one": file1})
	u, err = s.Usage(ctx, "child-a")
	if err != nil || u.Size < 1<<20 || u.Size > 1<<20+512<<10 {
		t.Errorf("usage of a child with a new 1 MiB file: %+v, %v", u, err)
	}
	if err := s.Commit(ctx, "child", "child-a"); err != nil {
		t.Fatal(err)
	}
	cu, err := s.Usage(ctx, "child")
	if err != nil || cu.Size != u.Size {
		t.Errorf("usage of the committed child %+v, %v; want the active's %d", cu, err, u.Size)
	}
	childID, _, _, _ := statID(t, s, "child")
	cm := graphInfo(t, g, s.graphName(childID))
	if cm.Changed < 256 || cm.Changed > 256+128 {
		t.Errorf("the child's delta holds %d blocks; want the 1 MiB file's 256 and a little metadata", cm.Changed)
	}
	if p, _ := g.Get(s.graphName(childID)); p.Parent != s.graphName(baseID) {
		t.Errorf("graph parent %q, want %q", p.Parent, s.graphName(baseID))
	}

	// The same file in an unrelated image is not stored again.
	ms, err = s.Prepare(ctx, "other-a", "", sizeLabel(64<<20))
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, ms, map[string][]byte{"copy": file8})
	if err := s.Commit(ctx, "other", "other-a"); err != nil {
		t.Fatal(err)
	}
	otherID, _, _, _ := statID(t, s, "other")
	om := graphInfo(t, g, s.graphName(otherID))
	if om.NewChunks > 256 || om.ReusedChunks < 2048 {
		t.Errorf("a second copy of an 8 MiB file stored %d new chunks and reused %d", om.NewChunks, om.ReusedChunks)
	}

	// Views see the committed content, read-only.
	ms, err = s.View(ctx, "v", "child")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms[0].Options) != 2 || ms[0].Options[1] != "ro" {
		t.Errorf("view options %v", ms[0].Options)
	}
	checkFiles(t, ms, map[string][]byte{"eight": file8, "one": file1})
}

// statID returns containerd's id of key.
func statID(t *testing.T, s *Snapshotter, key string) (string, snapshots.Info, snapshots.Usage, error) {
	t.Helper()
	var (
		id   string
		info snapshots.Info
		u    snapshots.Usage
	)
	err := s.view(context.Background(), func(ctx context.Context) error {
		var err error
		id, info, u, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return id, info, u, nil
}

// TestRestart: snapshots, labels, usage and active images survive a restart.
func TestRestart(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	root := t.TempDir()
	s, _, cleanup, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	labels := snapshots.WithLabels(map[string]string{"l": "1"})
	ms, err := s.Prepare(ctx, "a", "", labels)
	if err != nil {
		t.Fatal(err)
	}
	data := randomData(3, 300<<10)
	writeFiles(t, ms, map[string][]byte{"f": data})
	if err := s.Commit(ctx, "c", "a", labels); err != nil {
		t.Fatal(err)
	}
	ms, err = s.Prepare(ctx, "b", "c", snapshots.WithLabels(map[string]string{"l": "2"}))
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, ms, map[string][]byte{"g": []byte("active data\n")})
	before, err := s.Usage(ctx, "c")
	if err != nil {
		t.Fatal(err)
	}
	if err := cleanup(); err != nil {
		t.Fatal(err)
	}

	s, _, cleanup, err = open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	ci, err := s.Stat(ctx, "c")
	if err != nil || ci.Kind != snapshots.KindCommitted || ci.Labels["l"] != "1" {
		t.Fatalf("after a restart: %+v, %v", ci, err)
	}
	bi, err := s.Stat(ctx, "b")
	if err != nil || bi.Kind != snapshots.KindActive || bi.Parent != "c" || bi.Labels["l"] != "2" {
		t.Fatalf("after a restart: %+v, %v", bi, err)
	}
	after, err := s.Usage(ctx, "c")
	if err != nil || after != before {
		t.Errorf("usage %+v, %v after a restart; want %+v", after, err, before)
	}
	ms, err = s.Mounts(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, ms, map[string][]byte{"f": data, "g": []byte("active data\n")})
	if err := s.Commit(ctx, "c2", "b"); err != nil {
		t.Fatal(err)
	}
	ms, err = s.View(ctx, "v", "c2")
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, ms, map[string][]byte{"f": data, "g": []byte("active data\n")})
}

// TestErrors: bad input gets the categories containerd expects.
func TestErrors(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, _, _ := newSnapshotter(t)
	if _, err := s.Prepare(ctx, "a", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "child", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.View(ctx, "view", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prepare(ctx, "gone", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "gone"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		what string
		err  error
		is   func(error) bool
	}{
		{"stat of an unknown key", second(s.Stat(ctx, "nope")), errdefs.IsNotFound},
		{"usage of an unknown key", second(s.Usage(ctx, "nope")), errdefs.IsNotFound},
		{"mounts of an unknown key", second(s.Mounts(ctx, "nope")), errdefs.IsNotFound},
		{"mounts of a removed snapshot", second(s.Mounts(ctx, "gone")), errdefs.IsNotFound},
		{"mounts of a committed snapshot", second(s.Mounts(ctx, "c")), errdefs.IsFailedPrecondition},
		{"commit of an unknown key", s.Commit(ctx, "x", "nope"), errdefs.IsNotFound},
		{"commit of a view", s.Commit(ctx, "x", "view"), errdefs.IsFailedPrecondition},
		{"commit of a committed snapshot", s.Commit(ctx, "x", "c"), errdefs.IsFailedPrecondition},
		{"commit onto a taken name", s.Commit(ctx, "c", "child"), errdefs.IsAlreadyExists},
		{"commit with a new parent", s.Commit(ctx, "x", "child", snapshots.WithParent("other")), errdefs.IsInvalidArgument},
		{"remove of an unknown key", s.Remove(ctx, "nope"), errdefs.IsNotFound},
		{"remove of a snapshot with children", s.Remove(ctx, "c"), errdefs.IsFailedPrecondition},
		{"prepare over a missing parent", second(s.Prepare(ctx, "x", "nope")), errdefs.IsNotFound},
		{"prepare over an active parent", second(s.Prepare(ctx, "x", "child")), errdefs.IsInvalidArgument},
		{"prepare of a taken key", second(s.Prepare(ctx, "child", "")), errdefs.IsAlreadyExists},
		{"view of a taken key", second(s.View(ctx, "child", "c")), errdefs.IsAlreadyExists},
		{"a bad max-size label", second(s.Prepare(ctx, "x", "", snapshots.WithLabels(map[string]string{snapshots.LabelSnapshotMaxSize: "big"}))), errdefs.IsInvalidArgument},
		{"a tiny max-size label", second(s.Prepare(ctx, "x", "", sizeLabel(4096))), errdefs.IsInvalidArgument},
		{"update of an unknown key", second(s.Update(ctx, snapshots.Info{Name: "nope"})), errdefs.IsNotFound},
		{"an image of nobody", second(s.SnapshotForSource(ctx, "/etc/passwd")), errdefs.IsInvalidArgument},
	} {
		if tc.err == nil || !tc.is(tc.err) {
			t.Errorf("%s: %v", tc.what, tc.err)
		} else {
			t.Logf("%s: %v", tc.what, tc.err)
		}
	}
	// The failures above changed nothing.
	if _, err := s.Stat(ctx, "x"); !errdefs.IsNotFound(err) {
		t.Errorf("x exists after failed calls: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stat(ctx, "c"); !errdefs.IsUnavailable(err) {
		t.Errorf("stat after close: %v", err)
	}
}

func second[T any](_ T, err error) error { return err }

// TestCommitRefusesMountedImage: a mounted image is not a consistent
// filesystem; Commit says so and changes nothing.
func TestCommitRefusesMountedImage(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, _, _ := newSnapshotter(t)
	ms, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	withMounted(t, ms, func(dir string) error {
		err := s.Commit(ctx, "c", "a")
		if !errdefs.IsFailedPrecondition(err) || !strings.Contains(err.Error(), "mounted") {
			return fmt.Errorf("commit of a mounted image: %w", err)
		}
		return nil
	})
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotForSource: a mount's Source leads back to its snapshot.
func TestSnapshotForSource(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, g, _ := newSnapshotter(t, WithDefaultSize(16<<20))
	ms, err := s.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	src, err := s.SnapshotForSource(ctx, ms[0].Source)
	if err != nil || src.Key != "a" || src.Kind != snapshots.KindActive || src.Base != "" || src.Image != ms[0].Source {
		t.Fatalf("%+v, %v", src, err)
	}
	writeFiles(t, ms, map[string][]byte{"f": []byte("x")})
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SnapshotForSource(ctx, ms[0].Source); !errdefs.IsNotFound(err) {
		t.Errorf("the source of a committed snapshot: %v", err)
	}
	vms, err := s.View(ctx, "v", "c")
	if err != nil {
		t.Fatal(err)
	}
	src, err = s.SnapshotForSource(ctx, vms[0].Source)
	if err != nil || src.Key != "v" || src.Kind != snapshots.KindView || src.Map != MapName {
		t.Fatalf("%+v, %v", src, err)
	}
	// A view's image is its Base's map, byte for byte.
	r, err := g.OpenMap(src.Base, src.Map)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, r.Size())
	if _, err := r.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(src.Image)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("the view's image differs from %s/%s", src.Base, src.Map)
	}
}

// TestCleanup: removed snapshots' chunks are collected, and what a crash
// leaves (an unreferenced graph snapshot, a stray image file) is removed.
func TestCleanup(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	s, g, _ := newSnapshotter(t)
	ms, err := s.Prepare(ctx, "a", "", sizeLabel(32<<20))
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, ms, map[string][]byte{"f": randomData(4, 4<<20)})
	if err := s.Commit(ctx, "c", "a"); err != nil {
		t.Fatal(err)
	}
	ms, err = s.Prepare(ctx, "keep-a", "", sizeLabel(32<<20))
	if err != nil {
		t.Fatal(err)
	}
	keep := map[string][]byte{"k": randomData(5, 1<<20)}
	writeFiles(t, ms, keep)
	if err := s.Commit(ctx, "keep", "keep-a"); err != nil {
		t.Fatal(err)
	}
	// Leftovers of a crash.
	if _, err := g.Ingest(ctx, bytes.NewReader(randomData(6, 1<<20)), snapshotter.IngestOptions{Name: s.graphName("999")}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Ingest(ctx, bytes.NewReader([]byte("not ours")), snapshotter.IngestOptions{Name: "ctd-other"}); err != nil {
		t.Fatal(err)
	}
	// An unreferenced graph snapshot that another user of the graph built
	// on stays.
	if _, err := g.Ingest(ctx, bytes.NewReader([]byte("base")), snapshotter.IngestOptions{Name: s.graphName("997")}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Ingest(ctx, bytes.NewReader([]byte("vm disk")), snapshotter.IngestOptions{Name: "vm-disk", Parent: s.graphName("997")}); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(s.images, "998")
	if err := os.WriteFile(stray, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	before, err := g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	after, err := g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.Get(s.graphName("999")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("an unreferenced graph snapshot survived Cleanup: %v", err)
	}
	if _, err := g.Get(s.graphName("997")); err != nil {
		t.Errorf("Cleanup removed a graph snapshot another one is built on: %v", err)
	}
	if _, err := g.Get("ctd-other"); err != nil {
		t.Errorf("Cleanup removed a graph snapshot that is not its own: %v", err)
	}
	if _, err := os.Stat(stray); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a stray image survived Cleanup: %v", err)
	}
	if after.Store.PackBytes > before.Store.PackBytes-4<<20 || after.Store.GarbageBytes != 0 {
		t.Errorf("packs %d bytes before Cleanup, %d after (garbage %d); want the removed 4 MiB file's chunks gone",
			before.Store.PackBytes, after.Store.PackBytes, after.Store.GarbageBytes)
	}
	ms, err = s.View(ctx, "v", "keep")
	if err != nil {
		t.Fatal(err)
	}
	checkFiles(t, ms, keep)
}
