package cas

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestGetMany(t *testing.T) {
	g := newGen(7)
	var data []byte
	for i := range 300 {
		switch i % 5 {
		case 0:
			data = append(data, make([]byte, ChunkSize)...) // zero
		case 1:
			data = append(data, g.random(ChunkSize)...) // raw
		default:
			data = append(data, g.half()...) // s2
		}
	}
	s := openStore(t, t.TempDir())
	ids, _ := ingest(t, s, data)
	want := chunksOf(data)

	tests := []struct {
		name  string
		order []int
	}{
		{"in order", seq(0, len(ids))},
		{"reversed", reversed(seq(0, len(ids)))},
		{"one", []int{3}},
		{"repeated", []int{2, 2, 2, 3, 3, 0, 0}},
		{"empty", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sel := make([]ID, len(tc.order))
			for i, k := range tc.order {
				sel[i] = ids[k]
			}
			dst := bytes.Repeat([]byte{0xee}, len(sel)*ChunkSize)
			if err := s.GetMany(sel, dst); err != nil {
				t.Fatalf("GetMany: %v", err)
			}
			for i, k := range tc.order {
				if !bytes.Equal(dst[i*ChunkSize:(i+1)*ChunkSize], want[k]) {
					t.Fatalf("chunk %d (source %d): wrong bytes", i, k)
				}
			}
		})
	}

	t.Run("short buffer", func(t *testing.T) {
		err := s.GetMany(ids[:2], make([]byte, ChunkSize))
		wantErrIs(t, err, errdefs.ErrInvalidArgument)
	})
	t.Run("unknown chunk", func(t *testing.T) {
		err := s.GetMany([]ID{ids[1], Sum([]byte("not stored"))}, make([]byte, 2*ChunkSize))
		wantErrIs(t, err, errdefs.ErrNotFound)
	})
	t.Run("damaged chunk in a run", func(t *testing.T) {
		loc, err := s.Lookup(ids[7])
		if err != nil {
			t.Fatal(err)
		}
		flipByte(t, s.packPath(loc.Pack), int64(loc.Offset)+int64(loc.Stored)/2)
		err = s.GetMany(ids[5:10], make([]byte, 5*ChunkSize))
		if !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("GetMany over a damaged chunk: %v, want errdefs.ErrDataLoss", err)
		}
	})
}

func seq(lo, hi int) []int {
	var out []int
	for i := lo; i < hi; i++ {
		out = append(out, i)
	}
	return out
}

func reversed(s []int) []int {
	out := make([]int, len(s))
	for i, v := range s {
		out[len(s)-1-i] = v
	}
	return out
}

// TestGetManyDamagedInRun damages one chunk of a run read with one read
// (the chunks of a run are checked two at a time) and checks that reading
// the run fails on that chunk, wherever it lies in the run.
func TestGetManyDamagedInRun(t *testing.T) {
	for _, tc := range []struct {
		name         string
		chunks, hurt int
	}{
		{"first of a pair", 9, 0},
		{"second of a pair", 9, 1},
		{"inside the run", 9, 4},
		{"last pair", 8, 7},
		{"the odd one at the end", 9, 8},
		{"a run of two", 2, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGen(byte(10 + tc.hurt))
			var data []byte
			for i := range tc.chunks {
				if i%2 == 0 {
					data = append(data, g.random(ChunkSize)...)
				} else {
					data = append(data, g.text()...)
				}
			}
			s := openStore(t, t.TempDir())
			ids, _ := ingest(t, s, data)
			dst := make([]byte, len(ids)*ChunkSize)
			if err := s.GetMany(ids, dst); err != nil || !bytes.Equal(dst, data) {
				t.Fatalf("GetMany before the damage: %v (equal %v)", err, bytes.Equal(dst, data))
			}
			loc, err := s.Lookup(ids[tc.hurt])
			if err != nil {
				t.Fatal(err)
			}
			flipByte(t, s.packPath(loc.Pack), int64(loc.Offset)+int64(loc.Stored)-1)
			err = s.GetMany(ids, dst)
			if !errors.Is(err, errdefs.ErrDataLoss) || !strings.Contains(err.Error(), ids[tc.hurt].String()) {
				t.Fatalf("GetMany over chunk %d damaged: %v, want errdefs.ErrDataLoss naming it", tc.hurt, err)
			}
		})
	}
}
