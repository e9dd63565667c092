package cas

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// The index is a bbolt database rather than a format of our own: it gives
// ordered, mmap-backed lookups whose memory the kernel pages in and out (so a
// store far larger than RAM costs no heap), atomic multi-key updates for a
// sealed pack's entries and for GC's switch of locations, and a file lock that
// keeps a second process out. It is only a cache of the pack footers, so its
// durability needs are modest; Open rebuilds it when it is missing or damaged.
var (
	bucketChunks = []byte("chunks")
	bucketPacks  = []byte("packs")
	bucketMeta   = []byte("meta")
	keyVersion   = []byte("version")
	keyNextPack  = []byte("next-pack")
)

const indexVersion = 1

// Location is where a chunk lives.
type Location struct {
	Pack   uint32
	Offset uint32
	Stored uint32
	Codec  Codec
	Slot   uint8 // place in a zstd frame (see Entry)
	Frame  uint8 // chunks in that frame; 0 for other codecs
}

// Share is the chunk's part of the stored bytes: a frame's bytes are split
// evenly among the chunks it holds.
func (l Location) Share() uint32 { return l.Stored / max(uint32(l.Frame), 1) }

// locationSize is the encoded size: pack u32 | offset u32 | stored u16 | codec u8.
// A chunk in a zstd frame takes frameLocationSize: pack u32 | offset u32 |
// stored u32 | codec u8 | slot u8 | frame u8.
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

// DecodeLocation parses an index value.
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

// initIndex creates the buckets and checks the version.
func initIndex(tx *bolt.Tx) error {
	for _, name := range [][]byte{bucketChunks, bucketPacks, bucketMeta} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	meta := tx.Bucket(bucketMeta)
	v := meta.Get(keyVersion)
	if v == nil {
		return meta.Put(keyVersion, binary.BigEndian.AppendUint32(nil, indexVersion))
	}
	if len(v) != 4 || binary.BigEndian.Uint32(v) != indexVersion {
		return fmt.Errorf("index version %x not supported: %w", v, errdefs.ErrDataLoss)
	}
	return nil
}

// addPack records a sealed pack and its chunks. A chunk already indexed
// elsewhere keeps its location; the copy here is garbage for GC.
func addPack(tx *bolt.Tx, num uint32, size int64, entries []Entry) (added int, err error) {
	chunks := tx.Bucket(bucketChunks)
	// Random ids land everywhere in the tree; fuller leaves keep it small.
	chunks.FillPercent = 0.9
	// In id order, consecutive inserts land on the same or the next leaf.
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b Entry) int { return bytes.Compare(a.ID[:], b.ID[:]) })
	for _, e := range sorted {
		if chunks.Get(e.ID[:]) != nil {
			continue
		}
		loc := locationOf(num, e)
		if err := chunks.Put(e.ID[:], loc.marshal()); err != nil {
			return added, err
		}
		added++
	}
	rec := packRecord{State: packLive, Chunks: uint32(len(entries)), Size: uint64(size)}
	return added, tx.Bucket(bucketPacks).Put(packKey(num), rec.marshal())
}
