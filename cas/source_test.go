package cas

import (
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// A regular file is read through a mapping; the ids and counts must be those
// of reading it as a stream, and the file offset must end where a reader's
// would.
func TestWriteStreamFile(t *testing.T) {
	g := newGen(11)
	mixed := func(n int) []byte {
		var b []byte
		for len(b) < n {
			b = append(b, g.half()...)
			b = append(b, make([]byte, ChunkSize)...)
			b = append(b, g.random(ChunkSize)...)
		}
		return b[:n]
	}
	tests := []struct {
		name string
		data []byte
		skip int64 // bytes read from the file before WriteStream
	}{
		{"empty", nil, 0},
		{"short tail only", mixed(100), 0},
		{"one chunk", mixed(ChunkSize), 0},
		{"batches and a tail", mixed(batchChunks*ChunkSize*2 + 5), 0},
		{"from a page-aligned offset", mixed(batchChunks*ChunkSize + ChunkSize*3), ChunkSize},
		{"from an unaligned offset", mixed(3*ChunkSize + 9), 7},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "img")
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			want, wantStats := ingest(t, openStore(t, filepath.Join(dir, "a")), tc.data[tc.skip:])

			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Seek(tc.skip, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			s := openStore(t, filepath.Join(dir, "b"))
			w, got, n := writeFile(t, s, f)
			if n != int64(len(tc.data))-tc.skip {
				t.Errorf("read %d bytes, want %d", n, int64(len(tc.data))-tc.skip)
			}
			if len(got) != len(want) {
				t.Fatalf("%d ids, want %d", len(got), len(want))
			}
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("id %d differs between the file and the stream", i)
				}
			}
			if st := w.Stats(); st.NewChunks != wantStats.NewChunks || st.ZeroChunks != wantStats.ZeroChunks {
				t.Errorf("stats %+v, want %+v", st, wantStats)
			}
			if pos, _ := f.Seek(0, io.SeekCurrent); pos != int64(len(tc.data)) {
				t.Errorf("file offset %d after WriteStream, want %d", pos, len(tc.data))
			}
			chunks := chunksOf(tc.data[tc.skip:])
			checkReadable(t, s, got, chunks)
		})
	}
}

// A sparse file's holes are zero chunks that are never read: the ids, the
// bytes read back and the counts must be those of the same bytes as a
// stream, and every chunk that no data touches must count as a hole (where
// the file system tells holes from data).
func TestWriteStreamSparse(t *testing.T) {
	g := newGen(12)
	const cs = ChunkSize
	type extent struct {
		off  int64
		data []byte
	}
	zeros := func(n int) []byte { return make([]byte, n) }
	tests := []struct {
		name    string
		size    int64
		extents []extent
		skip    int64 // bytes read from the file before WriteStream
		holes   int64 // chunks no data touches
	}{
		{"all hole", 5*cs + 3, nil, 0, 6},
		{"no hole", 3 * cs, []extent{{0, g.half()}, {cs, g.text()}, {2 * cs, g.random(cs)}}, 0, 0},
		{"hole between data", 10 * cs, []extent{{0, g.half()}, {9 * cs, g.text()}}, 0, 8},
		{"leading and trailing holes", 600 * cs, []extent{{300 * cs, g.half()}}, 0, 599},
		{"data across a chunk edge", 4 * cs, []extent{{cs + cs/2, g.text()}}, 0, 2},
		{"a byte of data", 3 * cs, []extent{{2*cs - 1, []byte{7}}}, 0, 2},
		{"written zeros are data", 4 * cs, []extent{{cs, zeros(cs)}}, 0, 3},
		{"short tail in a hole", 2*cs + 100, []extent{{0, g.half()}}, 0, 2},
		{"short tail with data", 2*cs + 100, []extent{{2*cs + 50, []byte{1, 2}}}, 0, 2},
		{"batches of holes and data", 3*batchChunks*cs + 7, []extent{{10 * cs, g.half()}, {batchChunks * cs, g.text()}, {(2*batchChunks + 1) * cs, g.random(3 * cs)}}, 0, 3*batchChunks + 1 - 5},
		{"from a page-aligned offset", 8 * cs, []extent{{2 * cs, g.half()}, {6 * cs, g.text()}}, cs, 5},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "img")
			data := make([]byte, tc.size)
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.Truncate(tc.size); err != nil {
				t.Fatal(err)
			}
			for _, e := range tc.extents {
				if _, err := f.WriteAt(e.data, e.off); err != nil {
					t.Fatal(err)
				}
				copy(data[e.off:], e.data)
			}
			if _, err := f.Seek(tc.skip, io.SeekStart); err != nil {
				t.Fatal(err)
			}
			want, wantStats := ingest(t, openStore(t, filepath.Join(dir, "a")), data[tc.skip:])

			s := openStore(t, filepath.Join(dir, "b"))
			w, got, n := writeFile(t, s, f)
			if n != tc.size-tc.skip {
				t.Errorf("read %d bytes, want %d", n, tc.size-tc.skip)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("ids differ between the sparse file and the stream")
			}
			st := w.Stats()
			if st.NewChunks != wantStats.NewChunks || st.ZeroChunks != wantStats.ZeroChunks || st.Chunks != wantStats.Chunks {
				t.Errorf("stats %+v, want %+v", st, wantStats)
			}
			if wantStats.HoleChunks != 0 {
				t.Errorf("a stream has %d hole chunks, want 0", wantStats.HoleChunks)
			}
			if st.HoleChunks > st.ZeroChunks {
				t.Errorf("%d hole chunks, more than the %d zero chunks", st.HoleChunks, st.ZeroChunks)
			}
			if holesReported(t, f) && st.HoleChunks != tc.holes {
				t.Errorf("%d hole chunks, want %d", st.HoleChunks, tc.holes)
			}
			checkReadable(t, s, got, chunksOf(data[tc.skip:]))
		})
	}
}

// holesReported says whether the file system of f reports a file's holes,
// by asking for the data of a fresh file that is one hole.
func holesReported(t *testing.T, f *os.File) bool {
	t.Helper()
	probe, err := os.CreateTemp(filepath.Dir(f.Name()), "probe")
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	if err := probe.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	start, _, ok := dataExtent(int(probe.Fd()), 0)
	return ok && start >= 1<<20
}

// writeFile writes f into s with one writer and commits it: the writer, the ids in order and the bytes read.
func writeFile(t *testing.T, s *Store, f *os.File) (*Writer, []ID, int64) {
	t.Helper()
	w := s.NewWriter()
	var got []ID
	n, err := w.WriteStream(t.Context(), f, func(i int64, id ID) error {
		got = append(got, id)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	return w, got, n
}
