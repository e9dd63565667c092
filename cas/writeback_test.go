package cas

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// A pack's writer asks for writeback of what it wrote every writebackStep
// bytes, from where the last request ended; the bytes in the file are those
// written, whatever the requests.
func TestEarlyWriter(t *testing.T) {
	const step = writebackStep
	tests := []struct {
		name    string
		writes  []int
		started int64 // bytes whose writeback was asked for, in the end
	}{
		{"nothing", nil, 0},
		{"less than a step", []int{100, step - 101}, 0},
		{"a step at once", []int{step}, step},
		{"a step in pieces", []int{step / 2, step / 2}, step},
		{"past a step", []int{step - 1, 2}, step + 1},
		{"three steps and a bit", []int{step + 5, step, step - 5, 7}, 3*step + 7},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "pack"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			e := &earlyWriter{f: f}
			var want []byte
			for i, n := range tc.writes {
				b := slices.Repeat([]byte{byte(i + 1)}, n)
				if _, err := e.Write(b); err != nil {
					t.Fatal(err)
				}
				want = append(want, b...)
			}
			if e.started != tc.started || e.written != int64(len(want)) {
				t.Errorf("started %d, written %d; want %d, %d", e.started, e.written, tc.started, len(want))
			}
			got, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, want) {
				t.Error("the file does not hold the bytes written")
			}
		})
	}
}
