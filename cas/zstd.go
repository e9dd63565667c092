package cas

import (
	"bytes"
	"fmt"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/zstd"
)

// zstdLevel is the level compaction writes frames at: it runs off the hot
// path, so it buys size with time.
const zstdLevel = zstd.SpeedBetterCompression

var (
	zstdOnce sync.Once
	zstdEnc  *zstd.Encoder
	zstdDec  *zstd.Decoder
	zstdErr  error
)

// zstdCodec returns the shared encoder and decoder; both are safe for
// concurrent EncodeAll and DecodeAll calls.
func zstdCodec() (*zstd.Encoder, *zstd.Decoder, error) {
	zstdOnce.Do(func() {
		zstdEnc, zstdErr = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstdLevel), zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true))
		if zstdErr != nil {
			return
		}
		zstdDec, zstdErr = zstd.NewReader(nil, zstd.WithDecoderMaxMemory(MaxFrameChunks*ChunkSize), zstd.WithDecoderConcurrency(0))
	})
	return zstdEnc, zstdDec, zstdErr
}

// encodeFrame compresses raw, whole chunks back to back, into one frame.
func encodeFrame(raw, dst []byte) ([]byte, error) {
	enc, _, err := zstdCodec()
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	return enc.EncodeAll(raw, dst[:0]), nil
}

// decodeFrame decompresses a frame that must hold exactly chunks chunks.
func decodeFrame(frame []byte, chunks int) ([]byte, error) {
	_, dec, err := zstdCodec()
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	out, err := dec.DecodeAll(frame, make([]byte, 0, chunks*ChunkSize))
	if err != nil {
		return nil, fmt.Errorf("zstd: %w", err)
	}
	if len(out) != chunks*ChunkSize {
		return nil, fmt.Errorf("zstd frame decodes to %d bytes, want %d chunks", len(out), chunks)
	}
	return out, nil
}

// lastDecoded remembers the last frame decodeFrameOnce decoded, by its
// bytes: a caller that unpacks a frame's chunks one by one from a buffer
// (a remote pull) decodes it once, not once a chunk.
var lastDecoded struct {
	// mu protects the fields below.
	mu         sync.Mutex
	frame, raw []byte
}

// decodeFrameOnce is decodeFrame, remembering the last frame. The result is
// shared: callers copy out of it and never write to it.
func decodeFrameOnce(frame []byte, chunks int) ([]byte, error) {
	lastDecoded.mu.Lock()
	if len(lastDecoded.raw) == chunks*ChunkSize && bytes.Equal(lastDecoded.frame, frame) {
		raw := lastDecoded.raw
		lastDecoded.mu.Unlock()
		return raw, nil
	}
	lastDecoded.mu.Unlock()
	raw, err := decodeFrame(frame, chunks)
	if err != nil {
		return nil, err
	}
	lastDecoded.mu.Lock()
	lastDecoded.frame = append(lastDecoded.frame[:0], frame...)
	lastDecoded.raw = raw
	lastDecoded.mu.Unlock()
	return raw, nil
}

// frameCache keeps the last few decoded frames, so that reading the chunks
// of one frame in turn decodes it once. A pack number is never reused, so
// (pack, offset) names the same frame for the store's life. Every chunk
// taken from a cached frame is still checked against its id.
type frameCache struct {
	// mu protects the fields below.
	mu   sync.Mutex
	ents [frameCacheSize]cachedFrame
	next int
}

// frameCacheSize is how many decoded frames (up to 1 MiB each) are kept.
const frameCacheSize = 8

type cachedFrame struct {
	pack, off uint32
	data      []byte
}

func (c *frameCache) get(pack, off uint32) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.ents {
		if e.data != nil && e.pack == pack && e.off == off {
			return e.data
		}
	}
	return nil
}

func (c *frameCache) put(pack, off uint32, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ents[c.next] = cachedFrame{pack, off, data}
	c.next = (c.next + 1) % frameCacheSize
}

// readFramed reads a chunk of a zstd frame, decoding the frame unless it is
// cached, and checks the chunk against its id.
func (s *Store) readFramed(id ID, loc Location, dst []byte) ([]byte, error) {
	raw := s.frames.get(loc.Pack, loc.Offset)
	if raw == nil {
		f, err := s.file(loc.Pack)
		if err != nil {
			return nil, err
		}
		frame := make([]byte, loc.Stored)
		s.filesMu.RLock()
		_, err = f.ReadAt(frame, int64(loc.Offset))
		s.filesMu.RUnlock()
		if err != nil {
			return nil, fmt.Errorf("reading chunk %s from %s: %w", id, packName(loc.Pack), err)
		}
		raw, err = decodeFrame(frame, int(loc.Frame))
		if err != nil {
			return nil, fmt.Errorf("chunk %s in %s at offset %d is damaged: %w: %w", id, packName(loc.Pack), loc.Offset, err, errdefs.ErrDataLoss)
		}
		s.frames.put(loc.Pack, loc.Offset, raw)
	}
	at := int(loc.Slot) * ChunkSize
	// The cached frame is shared: check a copy, never the cache itself.
	copy(dst[:ChunkSize], raw[at:at+ChunkSize])
	return decodeChecked(id, Location{Pack: loc.Pack, Offset: loc.Offset, Stored: ChunkSize, Codec: CodecRaw}, dst[:ChunkSize], dst)
}
