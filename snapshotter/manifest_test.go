package snapshotter

import (
	"errors"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

func TestManifest(t *testing.T) {
	r := newRand(7)
	base := randomBytes(r, 64*4096)
	top := append([]byte(nil), base...)
	fillBlock(r, top, 3)
	fillBlock(r, top, 40)

	src := testutil.OpenGraph(t, t.TempDir(), Open)
	ingest(t, src, "base", "", base)
	ingest(t, src, "top", "base", top)
	mBase, err := src.Manifest("base")
	if err != nil {
		t.Fatal(err)
	}
	mTop, err := src.Manifest("top")
	if err != nil {
		t.Fatal(err)
	}
	ids, err := mTop.Chunks()
	if err != nil || len(ids) != 2 {
		t.Fatalf("chunks of top: %d %v, want the 2 it changed", len(ids), err)
	}

	// copyChunks puts the chunks of ms into g's store.
	copyChunks := func(g *Graph, ms ...Manifest) {
		w := g.Store().NewWriter()
		for _, m := range ms {
			ids, err := m.Chunks()
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range ids {
				b, err := src.Store().Get(id, nil)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := w.Put(b); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := w.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	damaged := mTop
	damaged.Deltas = map[string][]byte{"disk": append([]byte(nil), mTop.Deltas["disk"]...)}
	damaged.Deltas["disk"][len(damaged.Deltas["disk"])-1] ^= 1
	otherParent := mTop
	otherParent.ParentCreated = mTop.ParentCreated.Add(time.Second)
	otherSame := mBase
	otherSame.Snapshot.Created = mBase.Snapshot.Created.Add(time.Second)

	for _, tc := range []struct {
		name   string
		chunks []Manifest // whose chunks the destination store gets first
		add    []Manifest
		want   error
	}{
		{"chain", []Manifest{mBase, mTop}, []Manifest{mBase, mTop}, nil},
		{"twice", []Manifest{mBase}, []Manifest{mBase, mBase}, nil},
		{"missing chunks", []Manifest{mBase}, []Manifest{mBase, mTop}, errdefs.ErrFailedPrecondition},
		{"missing parent", []Manifest{mBase, mTop}, []Manifest{mTop}, errdefs.ErrNotFound},
		{"another parent", []Manifest{mBase, mTop}, []Manifest{mBase, otherParent}, errdefs.ErrFailedPrecondition},
		{"another of the name", []Manifest{mBase}, []Manifest{mBase, otherSame}, errdefs.ErrAlreadyExists},
		{"damaged delta", []Manifest{mBase, mTop}, []Manifest{mBase, damaged}, errdefs.ErrDataLoss},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := testutil.OpenGraph(t, t.TempDir(), Open)
			copyChunks(g, tc.chunks...)
			var err error
			for _, m := range tc.add {
				if err = g.AddManifest(m); err != nil {
					break
				}
			}
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("AddManifest: %v, want %v", err, tc.want)
			}
			if tc.want == nil {
				if tc.name == "chain" {
					checkExport(t, g, "top", "disk", top)
				}
			}
		})
	}
}
