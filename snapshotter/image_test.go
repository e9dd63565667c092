package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
)

// imageState is what a test expects of the maps of one snapshot.
type imageState map[string][]byte

func (s imageState) clone() imageState {
	out := imageState{}
	for k, v := range s {
		out[k] = slices.Clone(v)
	}
	return out
}

// writeBlock mirrors Image.WriteBlock on the expected bytes.
func (s imageState) writeBlock(m string, n int, data []byte) {
	b := s[m]
	if end := (n + 1) * bs; len(b) < end {
		b = append(b, make([]byte, end-len(b))...)
	}
	copy(b[n*bs:(n+1)*bs], make([]byte, bs))
	copy(b[n*bs:], data)
	s[m] = b
}

// setSize mirrors Image.SetSize.
func (s imageState) setSize(m string, size int) {
	b := s[m]
	if size <= len(b) {
		s[m] = b[:size:size]
		return
	}
	s[m] = append(b, make([]byte, size-len(b))...)
}

func checkState(t *testing.T, g *Graph, name string, want imageState) {
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

func TestImageTwoMaps(t *testing.T) {
	g := openGraph(t, t.TempDir())
	r := newRand(10)
	want := imageState{}

	img, err := g.NewImage("")
	if err != nil {
		t.Fatal(err)
	}
	for n := range 12 {
		d := randomBytes(r, bs)
		if err := img.WriteBlock("disk", KindDisk, uint64(n), d); err != nil {
			t.Fatal(err)
		}
		want.writeBlock("disk", n, d)
	}
	for _, n := range []int{0, 1, 7, 1500} { // memory is sparse
		d := randomBytes(r, 100+n)
		if err := img.WriteBlock("memory", KindMemory, uint64(n), d); err != nil {
			t.Fatal(err)
		}
		want.writeBlock("memory", n, d)
	}
	if err := img.SetSize("disk", KindDisk, 12*bs-300); err != nil {
		t.Fatal(err)
	}
	want.setSize("disk", 12*bs-300)
	s, err := img.Commit("vm-1", map[string]string{"state": "running"})
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
	img, err = g.NewImage("vm-1")
	if err != nil {
		t.Fatal(err)
	}
	child := want.clone()
	d := randomBytes(r, bs)
	if err := img.WriteBlock("memory", KindMemory, 1, d); err != nil {
		t.Fatal(err)
	}
	child.writeBlock("memory", 1, d)
	if err := img.WriteBlock("memory", KindMemory, 7, nil); err != nil { // zeroed
		t.Fatal(err)
	}
	child.writeBlock("memory", 7, nil)
	if err := img.WriteBlock("memory", KindMemory, 0, want["memory"][:bs]); err != nil { // unchanged
		t.Fatal(err)
	}
	s, err = img.Commit("vm-1.1", nil)
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
	img, err = g.NewImage("vm-1.1")
	if err != nil {
		t.Fatal(err)
	}
	grand := child.clone()
	stream := slices.Clone(child["disk"][:5*bs])
	fillBlock(r, stream, 2)
	info, err := img.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader(stream), nil)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(len(stream)) || info.NewChunks != 1 || info.ReusedChunks != 4 {
		t.Errorf("WriteMap: %+v", info)
	}
	grand["disk"] = stream
	if err := img.WriteBlock("extra", KindDisk, 3, []byte("third")); err != nil {
		t.Fatal(err)
	}
	grand.writeBlock("extra", 3, []byte("third"))
	if _, err := img.Commit("vm-1.1.1", nil); err != nil {
		t.Fatal(err)
	}
	checkState(t, g, "vm-1.1.1", grand)
	checkState(t, g, "vm-1.1", child)

	// An aborted image leaves nothing behind, and frees the write lock.
	img, err = g.NewImage("vm-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := img.WriteBlock("disk", KindDisk, 0, []byte("gone")); err != nil {
		t.Fatal(err)
	}
	img.Abort()
	if _, err := img.Commit("aborted", nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("Commit after Abort: %v", err)
	}
	if _, err := g.Get("aborted"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("aborted image became a snapshot: %v", err)
	}
	verifyOK(t, g)
}

// TestImageResize shrinks and grows inherited maps within one image: blocks
// cut off by a shrink must read zero when the map grows again.
func TestImageResize(t *testing.T) {
	g := openGraph(t, t.TempDir())
	r := newRand(11)
	parent := imageState{"disk": randomBytes(r, 2*pageLen*bs+5*bs)}
	img, err := g.NewImage("")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader(parent["disk"]), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := img.Commit("p", nil); err != nil {
		t.Fatal(err)
	}
	full := len(parent["disk"])
	states := map[string]imageState{"p": parent}
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
			img, err := g.NewImage("p")
			if err != nil {
				t.Fatal(err)
			}
			for _, st := range tc.steps {
				if st.size >= 0 {
					if err := img.SetSize("disk", KindDisk, int64(st.size)); err != nil {
						t.Fatal(err)
					}
					want.setSize("disk", st.size)
					continue
				}
				d := parent["disk"][st.block*bs : (st.block+1)*bs] // the parent's own block
				if st.block != 5 {
					d = randomBytes(r, bs)
				}
				if err := img.WriteBlock("disk", KindDisk, uint64(st.block), d); err != nil {
					t.Fatal(err)
				}
				want.writeBlock("disk", st.block, d)
			}
			name := "c" + string(rune('a'+i))
			s, err := img.Commit(name, nil)
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
	g = openGraph(t, root)
	for name, want := range states {
		checkState(t, g, name, want)
	}
	verifyOK(t, g)
}

// TestImageTailAcrossSnapshots cuts a map mid-block in one snapshot and
// grows it in the next: the bytes that were cut read zero.
func TestImageTailAcrossSnapshots(t *testing.T) {
	g := openGraph(t, t.TempDir())
	r := newRand(12)
	parent := imageState{"disk": randomBytes(r, 8*bs)}
	ingest(t, g, "p", "", parent["disk"])
	type op func(img *Image, s imageState) error
	setSize := func(size int) op {
		return func(img *Image, s imageState) error {
			s.setSize("disk", size)
			return img.SetSize("disk", KindDisk, int64(size))
		}
	}
	writeBlock := func(n int) op {
		return func(img *Image, s imageState) error {
			d := randomBytes(r, bs)
			s.writeBlock("disk", n, d)
			return img.WriteBlock("disk", KindDisk, uint64(n), d)
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
				img, err := g.NewImage(from)
				if err != nil {
					t.Fatal(err)
				}
				for _, o := range ops {
					if err := o(img, want); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := img.Commit(name, nil); err != nil {
					t.Fatal(err)
				}
				checkState(t, g, name, want)
			}
		})
	}
	verifyOK(t, g)
}

func TestImageAfterCommit(t *testing.T) {
	g := openGraph(t, t.TempDir())
	for _, finish := range []string{"commit", "abort"} {
		img, err := g.NewImage("")
		if err != nil {
			t.Fatal(err)
		}
		if err := img.WriteBlock("disk", KindDisk, 0, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if finish == "commit" {
			if _, err := img.Commit("done", nil); err != nil {
				t.Fatal(err)
			}
		} else {
			img.Abort()
		}
		if err := img.WriteBlock("disk", KindDisk, 1, []byte("y")); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("WriteBlock after %s: %v, want ErrFailedPrecondition", finish, err)
		}
		if err := img.SetSize("disk", KindDisk, 1); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("SetSize after %s: %v, want ErrFailedPrecondition", finish, err)
		}
		if _, err := img.WriteMap(context.Background(), "disk", KindDisk, bytes.NewReader([]byte("z")), nil); !errors.Is(err, errdefs.ErrFailedPrecondition) {
			t.Errorf("WriteMap after %s: %v, want ErrFailedPrecondition", finish, err)
		}
	}
	// The store's write lock was released: another image can start.
	img, err := g.NewImage("done")
	if err != nil {
		t.Fatal(err)
	}
	img.Abort()
	checkExport(t, g, "done", "disk", append([]byte("x"), make([]byte, bs-1)...))
}
