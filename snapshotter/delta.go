package snapshotter

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"math"
	"slices"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// Delta encoding, version 1:
//
//	"BXD1" | count uvarint | count × (gap uvarint | id [32]) | crc32c u32 LE
//
// Entries are in strictly increasing block order; gap is the distance from
// the previous entry's block plus one (from -1 for the first), so runs of
// consecutive blocks cost one byte of position each. The checksum covers
// everything before it.
var deltaMagic = []byte("BXD1")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// change is one entry of a delta.
type change struct {
	Block uint64
	ID    cas.ID
}

func encodeDelta(changes []change) []byte {
	slices.SortFunc(changes, func(a, b change) int {
		switch {
		case a.Block < b.Block:
			return -1
		case a.Block > b.Block:
			return 1
		}
		return 0
	})
	out := make([]byte, 0, len(deltaMagic)+binary.MaxVarintLen64+len(changes)*(33)+4)
	out = append(out, deltaMagic...)
	out = binary.AppendUvarint(out, uint64(len(changes)))
	next := uint64(0)
	for _, c := range changes {
		out = binary.AppendUvarint(out, c.Block-next)
		out = append(out, c.ID[:]...)
		next = c.Block + 1
	}
	return binary.LittleEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

// decodeDelta parses a delta, checking its checksum and order.
func decodeDelta(b []byte) ([]change, error) {
	if len(b) < len(deltaMagic)+1+4 || string(b[:len(deltaMagic)]) != string(deltaMagic) {
		return nil, fmt.Errorf("block map delta: bad header: %w", errdefs.ErrDataLoss)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != sum {
		return nil, fmt.Errorf("block map delta: checksum mismatch: %w", errdefs.ErrDataLoss)
	}
	p := body[len(deltaMagic):]
	count, n := uvarint(p)
	if n <= 0 || count > uint64(len(p))/33 {
		return nil, fmt.Errorf("block map delta: bad count: %w", errdefs.ErrDataLoss)
	}
	p = p[n:]
	changes := make([]change, 0, count)
	next := uint64(0)
	for range count {
		gap, n := uvarint(p)
		if n <= 0 || len(p) < n+32 {
			return nil, fmt.Errorf("block map delta: truncated entry: %w", errdefs.ErrDataLoss)
		}
		block := next + gap
		if block < next || block == math.MaxUint64 {
			return nil, fmt.Errorf("block map delta: block number overflows: %w", errdefs.ErrDataLoss)
		}
		changes = append(changes, change{Block: block, ID: cas.ID(p[n : n+32])})
		p = p[n+32:]
		next = block + 1
	}
	if len(p) != 0 {
		return nil, fmt.Errorf("block map delta: %d trailing bytes: %w", len(p), errdefs.ErrDataLoss)
	}
	return changes, nil
}

// uvarint is binary.Uvarint that also refuses an overlong encoding (a last
// byte of zero after others), which encodeDelta never writes: every delta
// has one encoding.
func uvarint(b []byte) (uint64, int) {
	v, n := binary.Uvarint(b)
	if n > 1 && b[n-1] == 0 {
		return 0, -n
	}
	return v, n
}
