package cas

import (
	"errors"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// A version 2 pack's footer is its version 1 footer packed: the entries'
// ids back to back, then each of the 16 bytes that follow an id in an
// entry as a column (byte 0 of every entry, then byte 1, ...), the whole
// compressed as one zstd frame. Chunk ids do not compress, but the columns
// of a compacted pack, whose frames share offsets and lengths, almost
// vanish: the footer shrinks from 48 to about 33 bytes a chunk.

// maxPackedFooter bounds what a packed footer may unpack to: a Writer seals
// a pack at PackTarget, counting 48 bytes an entry, so no honest footer
// comes near it.
const maxPackedFooter = 4 * PackTarget

var (
	footerOnce sync.Once
	footerEnc  *zstd.Encoder
	footerDec  *zstd.Decoder
	footerErr  error
)

func footerCodec() (*zstd.Encoder, *zstd.Decoder, error) {
	footerOnce.Do(func() {
		footerEnc, footerErr = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderCRC(false))
		if footerErr != nil {
			return
		}
		footerDec, footerErr = zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxPackedFooter), zstd.WithDecoderConcurrency(0))
	})
	return footerEnc, footerDec, footerErr
}

// packFooter packs a version 1 footer (whole entries back to back).
func packFooter(footer []byte) ([]byte, error) {
	enc, _, err := footerCodec()
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	n := len(footer) / entrySize
	cols := make([]byte, 0, len(footer))
	for i := range n {
		cols = append(cols, footer[i*entrySize:i*entrySize+len(ID{})]...)
	}
	for k := len(ID{}); k < entrySize; k++ {
		for i := range n {
			cols = append(cols, footer[i*entrySize+k])
		}
	}
	return enc.EncodeAll(cols, nil), nil
}

// unpackFooter turns a packed footer of count entries back into a version 1
// footer.
func unpackFooter(packed []byte, count uint64) ([]byte, error) {
	if count*entrySize > maxPackedFooter {
		return nil, fmt.Errorf("%d entries are more than a pack holds", count)
	}
	_, dec, err := footerCodec()
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	n := int(count)
	cols, err := dec.DecodeAll(packed, make([]byte, 0, n*entrySize))
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	if len(cols) != n*entrySize {
		return nil, errors.New("packed footer unpacks to the wrong length")
	}
	footer := make([]byte, n*entrySize)
	idLen := len(ID{})
	for i := range n {
		copy(footer[i*entrySize:], cols[i*idLen:(i+1)*idLen])
	}
	at := n * idLen
	for k := idLen; k < entrySize; k++ {
		for i := range n {
			footer[i*entrySize+k] = cols[at]
			at++
		}
	}
	return footer, nil
}
