package snapshotter

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"math"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// seal appends the checksum to a delta body.
func seal(body []byte) []byte {
	return binary.LittleEndian.AppendUint32(slices.Clone(body), crc32.Checksum(body, castagnoli))
}

func deltaSamples() [][]change {
	id := func(n byte) cas.ID { return cas.Sum([]byte{n}) }
	return [][]change{
		nil,
		{{0, id(1)}},
		{{0, cas.ZeroID}},
		{{1, id(1)}, {2, id(2)}, {3, id(3)}},
		{{200, id(1)}, {5, id(2)}, {128, cas.ZeroID}, {1 << 40, id(3)}}, // unsorted
		{{math.MaxUint64 - 1, id(9)}},
		{{0, id(1)}, {math.MaxUint64 - 1, id(2)}},
	}
}

func TestDeltaRoundTrip(t *testing.T) {
	for i, changes := range deltaSamples() {
		enc := encodeDelta(slices.Clone(changes))
		got, err := decodeDelta(enc)
		if err != nil {
			t.Fatalf("sample %d: %v", i, err)
		}
		want := slices.Clone(changes)
		slices.SortFunc(want, func(a, b change) int {
			if a.Block < b.Block {
				return -1
			}
			return 1
		})
		if len(got) != len(want) || (len(want) > 0 && !slices.Equal(got, want)) {
			t.Fatalf("sample %d: decoded %v, want %v", i, got, want)
		}
		if !bytes.Equal(encodeDelta(got), enc) {
			t.Fatalf("sample %d: re-encoding differs", i)
		}
	}
}

func TestDecodeDeltaRejects(t *testing.T) {
	id := cas.Sum([]byte("x"))
	good := encodeDelta([]change{{3, id}, {4, id}})
	body := good[:len(good)-4]
	entry := func(gap []byte) []byte { return append(slices.Clone(gap), id[:]...) }
	tests := []struct {
		name string
		b    []byte
	}{
		{"nil", nil},
		{"short", []byte("BXD1")},
		{"bad magic", seal(append([]byte("BXD2"), body[4:]...))},
		{"checksum", append(slices.Clone(body), 0, 0, 0, 0)},
		{"trailing byte", seal(append(slices.Clone(body), 0))},
		{"truncated entry", seal(body[:len(body)-1])},
		{"count too large", seal(append([]byte("BXD1\x03"), body[5:]...))},
		{"count overlong", seal(slices.Concat([]byte("BXD1\x81\x00"), entry([]byte{0})))},
		{"gap overlong", seal(slices.Concat([]byte("BXD1\x01"), entry([]byte{0x80, 0x00})))},
		{"gap overflows", seal(slices.Concat([]byte("BXD1\x02"), entry([]byte{5}), entry(binary.AppendUvarint(nil, math.MaxUint64-3))))},
		{"last block wraps the order", seal(slices.Concat([]byte("BXD1\x02"), entry(binary.AppendUvarint(nil, math.MaxUint64)), entry([]byte{0})))},
		{"count varint too long", seal([]byte("BXD1\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"))},
	}
	for _, tc := range tests {
		if got, err := decodeDelta(tc.b); !errors.Is(err, errdefs.ErrDataLoss) {
			t.Errorf("%s: decoded %v, %v; want errdefs.ErrDataLoss", tc.name, got, err)
		}
	}
}

func FuzzDecodeDelta(f *testing.F) {
	for _, changes := range deltaSamples() {
		f.Add(encodeDelta(changes))
	}
	f.Add([]byte{})
	f.Add([]byte("BXD1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		check := func(b []byte) {
			changes, err := decodeDelta(b)
			if err != nil {
				if !errors.Is(err, errdefs.ErrDataLoss) {
					t.Fatalf("error %v is not errdefs.ErrDataLoss", err)
				}
				return
			}
			for i := 1; i < len(changes); i++ {
				if changes[i].Block <= changes[i-1].Block {
					t.Fatalf("accepted blocks out of order: %v", changes)
				}
			}
			if re := encodeDelta(slices.Clone(changes)); !bytes.Equal(re, b) {
				t.Fatalf("accepted delta re-encodes differently:\n in  %x\n out %x", b, re)
			}
		}
		check(b)
		// Again with a valid checksum, so the body is what gets exercised.
		if len(b) >= 4 {
			check(seal(b[:len(b)-4]))
		}
		check(seal(b))
	})
}
