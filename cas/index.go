package cas

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// The store's metadata is a bbolt database, index.db: a record per pack
// (its state, chunks and size) and the next pack number. It gives atomic
// multi-key updates (GC marks its victims dead and its new packs live in one
// transaction) and a file lock. Chunk locations are not in it: they are in
// index segments (segment.go, chunkindex.go), about 45 bytes a chunk where
// bbolt took about 300. Both are caches of the pack footers, so their
// durability needs are modest; Open rebuilds them when missing or damaged.
//
// Version 1 also held a "chunks" bucket (id → location). Open migrates such
// a store (migrate.go): it keeps the pack records, finishing any pending
// deletion, writes them to a fresh version 2 database that replaces the old
// file, and builds the segments from the pack footers.
var (
	bucketPacks = []byte("packs")
	bucketMeta  = []byte("meta")
	keyVersion  = []byte("version")
	keyNextPack = []byte("next-pack")
)

// indexVersion is the version of index.db; legacyIndexVersion is the one
// that held chunk locations too.
const (
	indexVersion       = 2
	legacyIndexVersion = 1
)

// Location is where a chunk lives.
type Location struct {
	Pack   uint32
	Offset uint32
	Stored uint32
	Codec  Codec
	Slot   uint8 // place in a zstd frame (see Entry)
	Frame  uint8 // chunks in that frame; 0 for other codecs
}

// SameFrame reports whether l and o are chunks of one zstd frame: reading
// either decodes the frame, which the store keeps for a while.
func (l Location) SameFrame(o Location) bool {
	return l.Codec == CodecZstd && o.Codec == CodecZstd && l.Pack == o.Pack && l.Offset == o.Offset
}

// Share is the chunk's part of the stored bytes: a frame's bytes are split
// evenly among the chunks it holds.
func (l Location) Share() uint32 { return l.Stored / max(uint32(l.Frame), 1) }

// locationSize is the size of a location as version 1 of index.db stored
// it: pack u32 | offset u32 | stored u16 | codec u8. A chunk in a zstd
// frame took frameLocationSize: pack u32 | offset u32 | stored u32 |
// codec u8 | slot u8 | frame u8.
const (
	locationSize      = 11
	frameLocationSize = 15
)

func (l Location) marshal() []byte {
	if l.Codec == CodecZstd {
		b := make([]byte, frameLocationSize)
		binary.BigEndian.PutUint32(b[0:], l.Pack)
		binary.BigEndian.PutUint32(b[4:], l.Offset)
		binary.BigEndian.PutUint32(b[8:], l.Stored)
		b[12], b[13], b[14] = byte(l.Codec), l.Slot, l.Frame
		return b
	}
	b := make([]byte, locationSize)
	binary.BigEndian.PutUint32(b[0:], l.Pack)
	binary.BigEndian.PutUint32(b[4:], l.Offset)
	binary.BigEndian.PutUint16(b[8:], uint16(l.Stored))
	b[10] = byte(l.Codec)
	return b
}

// DecodeLocation parses a location as version 1 of index.db stored it.
func DecodeLocation(b []byte) (Location, error) {
	if len(b) == frameLocationSize {
		return decodeFrameLocation(b)
	}
	if len(b) != locationSize {
		return Location{}, fmt.Errorf("index entry is %d bytes, want %d: %w", len(b), locationSize, errdefs.ErrDataLoss)
	}
	l := Location{
		Pack:   binary.BigEndian.Uint32(b[0:]),
		Offset: binary.BigEndian.Uint32(b[4:]),
		Stored: uint32(binary.BigEndian.Uint16(b[8:])),
		Codec:  Codec(b[10]),
	}
	e := Entry{Offset: l.Offset, Stored: l.Stored, Raw: ChunkSize, Codec: l.Codec}
	if err := e.check(maxPackSize); err != nil {
		return Location{}, fmt.Errorf("index entry: %w", err)
	}
	return l, nil
}

// decodeFrameLocation parses the index value of a chunk in a zstd frame.
func decodeFrameLocation(b []byte) (Location, error) {
	l := Location{
		Pack:   binary.BigEndian.Uint32(b[0:]),
		Offset: binary.BigEndian.Uint32(b[4:]),
		Stored: binary.BigEndian.Uint32(b[8:]),
		Codec:  Codec(b[12]),
		Slot:   b[13],
		Frame:  b[14],
	}
	if l.Codec != CodecZstd {
		return Location{}, fmt.Errorf("index entry of %d bytes with codec %s: %w", len(b), l.Codec, errdefs.ErrDataLoss)
	}
	if err := l.entry().check(maxPackSize); err != nil {
		return Location{}, fmt.Errorf("index entry: %w", err)
	}
	return l, nil
}

// entry is the footer entry l was made from, less the id.
func (l Location) entry() Entry {
	return Entry{Offset: l.Offset, Stored: l.Stored, Raw: ChunkSize, Codec: l.Codec, Slot: l.Slot, Frame: l.Frame}
}

// locationOf is where the footer entry e of pack num puts its chunk.
func locationOf(num uint32, e Entry) Location {
	return Location{Pack: num, Offset: e.Offset, Stored: e.Stored, Codec: e.Codec, Slot: e.Slot, Frame: e.Frame}
}

// packState is the index's record of one pack.
type packState uint8

const (
	packLive     packState = 0
	packDeleting packState = 1 // its chunks moved; the file is to be removed
)

// packRecord: state u8 | chunks u32 | size u64.
type packRecord struct {
	State  packState
	Chunks uint32
	Size   uint64
}

func (r packRecord) marshal() []byte {
	b := make([]byte, 13)
	b[0] = byte(r.State)
	binary.BigEndian.PutUint32(b[1:], r.Chunks)
	binary.BigEndian.PutUint64(b[5:], r.Size)
	return b
}

func decodePackRecord(b []byte) (packRecord, error) {
	if len(b) != 13 || b[0] > byte(packDeleting) {
		return packRecord{}, fmt.Errorf("pack record of %d bytes: %w", len(b), errdefs.ErrDataLoss)
	}
	return packRecord{State: packState(b[0]), Chunks: binary.BigEndian.Uint32(b[1:]), Size: binary.BigEndian.Uint64(b[5:])}, nil
}

func packKey(num uint32) []byte {
	var k [4]byte
	binary.BigEndian.PutUint32(k[:], num)
	return k[:]
}

// errLegacyIndex says index.db is of version 1, to migrate.
var errLegacyIndex = errors.New("index of version 1")

// initIndex creates the buckets and checks the version.
func initIndex(tx *bolt.Tx) error {
	meta := tx.Bucket(bucketMeta)
	if meta != nil {
		v := meta.Get(keyVersion)
		if len(v) == 4 && binary.BigEndian.Uint32(v) == legacyIndexVersion {
			return errLegacyIndex
		}
	}
	for _, name := range [][]byte{bucketPacks, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	meta = tx.Bucket(bucketMeta)
	v := meta.Get(keyVersion)
	if v == nil {
		return meta.Put(keyVersion, binary.BigEndian.AppendUint32(nil, indexVersion))
	}
	if len(v) != 4 || binary.BigEndian.Uint32(v) != indexVersion {
		return fmt.Errorf("index version %x not supported: %w", v, errdefs.ErrDataLoss)
	}
	return nil
}

func beUint32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
