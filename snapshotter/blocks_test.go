package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"math"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

func TestWriteBlocks(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	base := bytes.Repeat([]byte("base block "), 4*cas.ChunkSize/11+1)[:4*cas.ChunkSize]
	if _, err := g.Ingest(context.Background(), bytes.NewReader(base), IngestOptions{Name: "p", Kind: KindMemory}); err != nil {
		t.Fatal(err)
	}
	draft, err := g.NewDraft("p")
	if err != nil {
		t.Fatal(err)
	}
	one := bytes.Repeat([]byte{1}, cas.ChunkSize)
	six := bytes.Repeat([]byte{6}, cas.ChunkSize)
	if _, err := draft.WriteBlocks(context.Background(), "memory", KindMemory, []uint64{1, 6}, bytes.NewReader(append(one, six...))); err != nil {
		t.Fatal(err)
	}
	snap, err := draft.Commit("c", nil)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := snap.Map("memory")
	if m.Size != 7*cas.ChunkSize || m.Changed != 2 {
		t.Fatalf("size %d, %d changed; want %d, 2", m.Size, m.Changed, 7*cas.ChunkSize)
	}
	r, err := g.OpenMap("c", "memory")
	if err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(base), make([]byte, 3*cas.ChunkSize)...)
	copy(want[cas.ChunkSize:], one)
	copy(want[6*cas.ChunkSize:], six)
	got := make([]byte, len(want))
	if _, err := r.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("map after WriteBlocks differs")
	}

	bad := []struct {
		name   string
		blocks []uint64
		data   []byte
	}{
		{"more data than blocks", []uint64{1}, append(one, six...)},
		{"less data than blocks", []uint64{1, 2}, one},
		{"block beyond any image", []uint64{math.MaxUint64 / cas.ChunkSize}, one},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			draft, err := g.NewDraft("p")
			if err != nil {
				t.Fatal(err)
			}
			defer draft.Abort()
			if _, err := draft.WriteBlocks(context.Background(), "memory", KindMemory, tc.blocks, bytes.NewReader(tc.data)); !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
}
