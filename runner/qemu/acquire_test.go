package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Restores that start at once from a snapshot without a memory file share
// one rebuild of it; a rebuild that fails fails them all.
func TestAcquireBuildsOnce(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	ctx := context.Background()
	mem := bytes.Repeat([]byte("guest memory page of boxd\n"), 40<<10) // about 1 MiB
	mem = mem[:len(mem)/memstore.PageSize*memstore.PageSize]
	if _, err := g.Ingest(ctx, bytes.NewReader(mem), snapshotter.IngestOptions{
		Name: "snap", Kind: snapshotter.KindMemory, MapName: memstore.DefaultMap,
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Ingest(ctx, bytes.NewReader(mem[:memstore.PageSize]), snapshotter.IngestOptions{Name: "disk-only"}); err != nil {
		t.Fatal(err)
	}
	r := &Runner{MemDir: t.TempDir(), Graph: g}
	const n = 8
	for _, tc := range []struct {
		snap   string
		builds int64
		err    error
	}{
		{"snap", 1, nil},
		{"disk-only", 0, errdefs.ErrNotFound}, // no memory map: every restore fails
	} {
		r.builds.Store(0)
		paths := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { paths[i], errs[i] = r.acquire(ctx, tc.snap) })
		}
		wg.Wait()
		if got := r.builds.Load(); tc.builds > 0 && got != tc.builds {
			t.Errorf("%s: %d concurrent restores built its memory file %d times, want %d", tc.snap, n, got, tc.builds)
		}
		for i := range n {
			if tc.err != nil {
				if !errors.Is(errs[i], tc.err) {
					t.Errorf("%s: restore %d: %v, want %v", tc.snap, i, errs[i], tc.err)
				}
				continue
			}
			if errs[i] != nil || paths[i] != paths[0] {
				t.Fatalf("%s: restore %d got %q, %v; restore 0 got %q", tc.snap, i, paths[i], errs[i], paths[0])
			}
		}
		if tc.err != nil {
			continue
		}
		got, err := os.ReadFile(paths[0])
		if err != nil || !bytes.Equal(got, mem) {
			t.Fatalf("%s: the rebuilt file (%d bytes, %v) is not the snapshot's memory", tc.snap, len(got), err)
		}
		for range n {
			r.release(paths[0])
		}
		r.dropFrozen(tc.snap)
		if left := r.FrozenFiles(); len(left) != 0 {
			t.Fatalf("%s: frozen files after every restore let go: %v", tc.snap, left)
		}
		if _, err := os.Stat(paths[0]); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s: the memory file outlived its snapshot's restores: %v", tc.snap, err)
		}
	}
}
