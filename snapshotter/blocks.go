package snapshotter

import (
	"context"
	"fmt"
	"io"
	"math"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// WriteBlocks sets the listed blocks of map name from r, which holds their
// contents back to back (ChunkSize bytes each, in the order listed). Blocks
// not listed keep what the parent had: this is how an incremental capture
// writes only what changed. The map grows to cover the blocks if needed.
func (d *Draft) WriteBlocks(ctx context.Context, name string, kind Kind, blocks []uint64, r io.Reader) (MapInfo, error) {
	for _, b := range blocks {
		if b >= math.MaxInt64/cas.ChunkSize {
			return MapInfo{}, fmt.Errorf("block %d is beyond the largest image: %w", b, errdefs.ErrInvalidArgument)
		}
	}
	m, err := d.mapFor(name, kind)
	if err != nil {
		return MapInfo{}, err
	}
	if m.info.Size%cas.ChunkSize != 0 {
		// The map may grow past its last, partial block: its tail must
		// read zero then, as WriteBlock ensures.
		if err := d.cutTail(m, m.info.Size); err != nil {
			return MapInfo{}, err
		}
	}
	before := d.w.Stats()
	var last uint64
	n, err := d.w.WriteStream(ctx, r, func(i int64, id cas.ID) error {
		if i >= int64(len(blocks)) {
			return fmt.Errorf("input holds more than the %d blocks listed: %w", len(blocks), errdefs.ErrInvalidArgument)
		}
		last = max(last, blocks[i])
		m.record(blocks[i], id)
		return nil
	})
	if err != nil {
		return MapInfo{}, err
	}
	if n != int64(len(blocks))*cas.ChunkSize {
		return MapInfo{}, fmt.Errorf("input holds %d bytes, want %d for %d blocks: %w", n, int64(len(blocks))*cas.ChunkSize, len(blocks), errdefs.ErrInvalidArgument)
	}
	if len(blocks) > 0 {
		if end := int64(last+1) * cas.ChunkSize; end > m.info.Size {
			m.info.Size = end
		}
	}
	m.count(before, d.w.Stats())
	return m.info, nil
}
