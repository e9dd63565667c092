package cas

import (
	"io"
	"os"
	"path/filepath"
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
