package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

// mapsState is what a test expects of the maps of one snapshot.
type mapsState map[string][]byte

func (s mapsState) clone() mapsState {
	out := mapsState{}
	for k, v := range s {
		out[k] = slices.Clone(v)
	}
	return out
}

// writeBlock mirrors Draft.WriteBlock on the expected bytes.
func (s mapsState) writeBlock(m string, n int, data []byte) {
	b := s[m]
	if end := (n + 1) * bs; len(b) < end {
		b = append(b, make([]byte, end-len(b))...)
	}
	copy(b[n*bs:(n+1)*bs], make([]byte, bs))
	copy(b[n*bs:], data)
	s[m] = b
}

// setSize mirrors Draft.SetSize.
func (s mapsState) setSize(m string, size int) {
	b := s[m]
	if size <= len(b) {
		s[m] = b[:size:size]
		return
	}
	s[m] = append(b, make([]byte, size-len(b))...)
}

func checkState(t *testing.T, g *Graph, name string, want mapsState) {
	t.Helper()
	s, err := g.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Maps) != len(want) {
		t.Fatalf("%s has maps %+v, want %d", name, s.Maps, len(want))
	}
	var total int64
	for m, data := range want {
		info, ok := s.Map(m)
		if !ok || info.Size != int64(len(data)) {
			t.Fatalf("%s map %s: %+v (present %v), want %d bytes", name, m, info, ok, len(data))
		}
		total += info.Size
		checkExport(t, g, name, m, data)
	}
	if s.Size() != total {
		t.Errorf("%s: Size() = %d, want %d", name, s.Size(), total)
	}
}

func TestDraftTwoMaps(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(10)
	want := mapsState{}

	draft, err := g.NewDraft("")
	if err != nil {
		t.Fatal(err)
	}
	for n := range 12 {
		d := randomBytes(r, bs)
		if err := draft.WriteBlock("disk", KindDisk, uint64(n), d); err != nil {
			t.Fatal(err)
		}
		want.writeBlock("disk", n, d)
	}
	for _, n := range []int{0, 1, 7, 1500} { // memory is sparse
		d := randomBytes(r, 100+n)
		if err := draft.WriteBlock("memory", KindMemory, uint64(n), d); err != nil {
			t.Fatal(err)
		}
		want.writeBlock("memory", n, d)
	}
	if err := draft.SetSize("disk", KindDisk, 12*bs-300); err != nil {
		t.Fatal(err)
	}
	want.setSize("disk", 12*bs-300)
	s, err := draft.Commit("vm-1", map[string]string{"state": "running"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Labels["state"] != "running" || s.Parent != "" {
		t.Fatalf("committed %+v", s)
	}
	if d, _ := s.Map("disk"); d.Kind != KindDisk || d.Changed != 12 || d.NewChunks != 12 {
		t.Errorf("disk map %+v, want 12 changed and new blocks", d)
	}
	if m, _ := s.Map("memory"); m.Kind != KindMemory || m.Changed != 4 || m.Size != 1501*bs {
		t.Errorf("memory map %+v", m)
	}
	checkState(t, g, "vm-1", want)

	// The child writes only memory: it inherits disk unchanged.
	draft, err = g.NewDraft("vm-1")
	if err != nil {
		t.Fatal(err)
	}
	child := want.clone()
	d := randomBytes(r, bs)
	if err := draft.WriteBlock("memory", KindMemory, 1, d); err != nil {
		t.Fatal(err)
	}
	child.writeBlock("memory", 1, d)
	if err := draft.WriteBlock("memory", KindMemory, 7, nil); err != nil { // zeroed
		t.Fatal(err)
	}
	child.writeBlock("memory", 7, nil)
	if err := draft.WriteBlock("memory", KindMemory, 0, want["memory"][:bs]); err != nil { // unchanged
		t.Fatal(err)
	}
	s, err = draft.Commit("vm-1.1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if dm, _ := s.Map("disk"); dm.Changed != 0 {
		t.Errorf("inherited disk map records %d changes", dm.Changed)
	}
	if mm, _ := s.Map("memory"); mm.Changed != 2 || mm.ZeroChunks != 1 || mm.ReusedChunks != 1 {
		t.Errorf("memory map %+v, want 2 changes, 1 zero chunk, 1 reused", mm)
	}
	checkState(t, g, "vm-1.1", child)
	checkState(t, g, "vm-1", want)

	// The grandchild replaces disk with a stream and adds a third map.
	draft, err = g.NewDraft("vm-1.1")
	if err != nil {
		t.Fatal(err)
	}
	grand := child.clone()
	stream := slices.Clone(child["disk"][:5*bs])
	fillBlock(r, stream, 2)
	info, err := draft.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader(stream), nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(stream)) || info.NewChunks != 1 || info.ReusedChunks != 4 {
		t.Errorf("WriteMap: %+v", info)
	}
	grand["disk"] = stream
	if err := draft.WriteBlock("extra", KindDisk, 3, []byte("third")); err != nil {
		t.Fatal(err)
	}
	grand.writeBlock("extra", 3, []byte("third"))
	if _, err := draft.Commit("vm-1.1.1", nil); err != nil {
		t.Fatal(err)
	}
	checkState(t, g, "vm-1.1.1", grand)
	checkState(t, g, "vm-1.1", child)

	// An aborted draft leaves nothing behind, and frees the write lock.
	draft, err = g.NewDraft("vm-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := draft.WriteBlock("disk", KindDisk, 0, []byte("gone")); err != nil {
		t.Fatal(err)
	}
	draft.Abort()
	if _, err := draft.Commit("aborted", nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Commit after Abort: %v", err)
	}
	if _, err := g.Get("aborted"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("aborted draft became a snapshot: %v", err)
	}
	verifyOK(t, g)
}

// TestDraftResize shrinks and grows inherited maps within one draft: blocks
// cut off by a shrink must read zero when the map grows again.
func TestDraftResize(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(11)
	parent := mapsState{"disk": randomBytes(r, 2*pageLen*bs+5*bs)}
	draft, err := g.NewDraft("")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := draft.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader(parent["disk"]), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := draft.Commit("p", nil); err != nil {
		t.Fatal(err)
	}
	full := len(parent["disk"])
	states := map[string]mapsState{"p": parent}
	type step struct {
		size  int // SetSize when >= 0
		block int // else WriteBlock at block
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"shrink then grow", []step{{bs, 0}, {full, 0}}},
		{"shrink mid block then grow", []step{{3*bs + 7, 0}, {full, 0}}},
		{"shrink to zero then grow", []step{{0, 0}, {full, 0}}},
		{"shrink across pages then grow past", []step{{pageLen*bs + 1, 0}, {full + 3*bs, 0}}},
		{"shrink then write beyond", []step{{2 * bs, 0}, {-1, 10}}},
		{"shrink then write back the old block", []step{{2 * bs, 0}, {-1, 5}, {full, 0}}},
		{"grow then shrink", []step{{full + pageLen*bs, 0}, {full - 1, 0}}},
		{"shrink twice then grow", []step{{10 * bs, 0}, {4 * bs, 0}, {8 * bs, 0}}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := parent.clone()
			draft, err := g.NewDraft("p")
			if err != nil {
				t.Fatal(err)
			}
			for _, st := range tc.steps {
				if st.size >= 0 {
					if err := draft.SetSize("disk", KindDisk, int64(st.size)); err != nil {
						t.Fatal(err)
					}
					want.setSize("disk", st.size)
					continue
				}
				d := parent["disk"][st.block*bs : (st.block+1)*bs] // the parent's own block
				if st.block != 5 {
					d = randomBytes(r, bs)
				}
				if err := draft.WriteBlock("disk", KindDisk, uint64(st.block), d); err != nil {
					t.Fatal(err)
				}
				want.writeBlock("disk", st.block, d)
			}
			name := "c" + string(rune('a'+i))
			s, err := draft.Commit(name, nil)
			if err != nil {
				t.Fatal(err)
			}
			m, _ := s.Map("disk")
			if want := changedBlocks(parent["disk"], want["disk"]); m.Changed != want {
				t.Errorf("Changed = %d, want %d", m.Changed, want)
			}
			checkState(t, g, name, want)
			states[name] = want
		})
	}
	// A fresh graph resolves every child from the stored deltas alone.
	root := g.Root()
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	g = testutil.OpenGraph(t, root, Open)
	for name, want := range states {
		checkState(t, g, name, want)
	}
	verifyOK(t, g)
}

// TestDraftTailAcrossSnapshots cuts a map mid-block in one snapshot and
// grows it in the next: the bytes that were cut read zero.
func TestDraftTailAcrossSnapshots(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	r := newRand(12)
	parent := mapsState{"disk": randomBytes(r, 8*bs)}
	ingest(t, g, "p", "", parent["disk"])
	type op func(draft *Draft, s mapsState) error
	setSize := func(size int) op {
		return func(draft *Draft, s mapsState) error {
			s.setSize("disk", size)
			return draft.SetSize("disk", KindDisk, int64(size))
		}
	}
	writeBlock := func(n int) op {
		return func(draft *Draft, s mapsState) error {
			d := randomBytes(r, bs)
			s.writeBlock("disk", n, d)
			return draft.WriteBlock("disk", KindDisk, uint64(n), d)
		}
	}
	tests := []struct {
		name         string
		child, grand []op
	}{
		{"cut, then grown by SetSize", []op{setSize(3*bs + 7)}, []op{setSize(8 * bs)}},
		{"cut, then grown by a block beyond", []op{setSize(3*bs + 7)}, []op{writeBlock(6)}},
		{"cut a written block, then grown", []op{writeBlock(2), setSize(2*bs + 1)}, []op{setSize(5*bs + 3)}},
		{"cut twice, then grown", []op{setSize(5*bs + 100), setSize(5*bs + 10)}, []op{setSize(6 * bs)}},
		{"cut, written in place, grown", []op{setSize(3*bs + 7)}, []op{writeBlock(3), setSize(7 * bs)}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := parent.clone()
			c, gc := "c"+string(rune('a'+i)), "g"+string(rune('a'+i))
			for gen, ops := range [][]op{tc.child, tc.grand} {
				from, name := "p", c
				if gen == 1 {
					from, name = c, gc
				}
				draft, err := g.NewDraft(from)
				if err != nil {
					t.Fatal(err)
				}
				for _, o := range ops {
					if err := o(draft, want); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := draft.Commit(name, nil); err != nil {
					t.Fatal(err)
				}
				checkState(t, g, name, want)
			}
		})
	}
	verifyOK(t, g)
}

func TestDraftAfterCommit(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	for _, finish := range []string{"commit", "abort"} {
		draft, err := g.NewDraft("")
		if err != nil {
			t.Fatal(err)
		}
		if err := draft.WriteBlock("disk", KindDisk, 0, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if finish == "commit" {
			if _, err := draft.Commit("done", nil); err != nil {
				t.Fatal(err)
			}
		} else {
			draft.Abort()
		}
		if err := draft.WriteBlock("disk", KindDisk, 1, []byte("y")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("WriteBlock after %s: %v, want ErrFailedPrecondition", finish, err)
		}
		if err := draft.SetSize("disk", KindDisk, 1); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("SetSize after %s: %v, want ErrFailedPrecondition", finish, err)
		}
		if _, err := draft.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader([]byte("z")), nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("WriteMap after %s: %v, want ErrFailedPrecondition", finish, err)
		}
	}
	// The store's write lock was released: another draft can start.
	draft, err := g.NewDraft("done")
	if err != nil {
		t.Fatal(err)
	}
	draft.Abort()
	checkExport(t, g, "done", "disk", append([]byte("x"), make([]byte, bs-1)...))
}

// TestMapKindCodec checks that the store keeps a memory map's new chunks
// raw and compresses a disk map's, whichever way the draft writes them.
func TestMapKindCodec(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), Open)
	draft, err := g.NewDraft("")
	if err != nil {
		t.Fatal(err)
	}
	tag := 0
	text := func() []byte { // compressible, and unique
		tag++
		return bytes.Repeat(fmt.Appendf(nil, "block %d: the same words again and again. ", tag), bs)[:bs]
	}
	writes := []struct {
		name  string
		write func(name string, kind Kind, data []byte) error
	}{
		{"WriteMap", func(name string, kind Kind, data []byte) error {
			_, err := draft.WriteMap(context.Background(), name, kind, bytes.NewReader(data), nil)
			return err
		}},
		{"WriteBlocks", func(name string, kind Kind, data []byte) error {
			_, err := draft.WriteBlocks(context.Background(), name, kind, []uint64{5}, bytes.NewReader(data))
			return err
		}},
		{"WriteBlock", func(name string, kind Kind, data []byte) error { return draft.WriteBlock(name, kind, 9, data) }},
	}
	type written struct {
		what string
		id   cas.ID
		want cas.Codec
	}
	var all []written
	for _, w := range writes {
		for _, k := range []struct {
			kind Kind
			want cas.Codec
		}{{KindMemory, cas.CodecRaw}, {KindDisk, cas.CodecS2}, {KindMemory, cas.CodecRaw}} {
			data := text()
			name := w.name + "-" + string(k.kind)
			if err := w.write(name, k.kind, data); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			all = append(all, written{name, cas.Sum(data), k.want})
		}
	}
	if _, err := draft.Commit("kinds", nil); err != nil {
		t.Fatal(err)
	}
	for _, w := range all {
		loc, err := g.Store().Lookup(w.id)
		if err != nil {
			t.Fatalf("%s: %v", w.what, err)
		}
		if loc.Codec != w.want {
			t.Errorf("%s: chunk stored as %v, want %v", w.what, loc.Codec, w.want)
		}
	}
}
