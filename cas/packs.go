package cas

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// PackInfo describes one sealed pack of the store.
type PackInfo struct {
	Num    uint32
	Size   int64
	Chunks uint32
}

// Name is the pack's file name in the store's packs folder.
func (p PackInfo) Name() string { return packName(p.Num) }

// Pack returns the sealed, live pack num.
func (s *Store) Pack(num uint32) (PackInfo, error) {
	var p PackInfo
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketPacks).Get(packKey(num))
		if v == nil {
			return fmt.Errorf("%s: %w", packName(num), errdefs.ErrNotFound)
		}
		rec, err := decodePackRecord(v)
		if err != nil {
			return err
		}
		if rec.State != packLive {
			return fmt.Errorf("%s is being removed: %w", packName(num), errdefs.ErrNotFound)
		}
		p = PackInfo{Num: num, Size: int64(rec.Size), Chunks: rec.Chunks}
		return nil
	})
	return p, err
}

// OpenPack opens sealed pack num for reading, with its footer's entries.
// The file stays readable after GC removes the pack, until it is closed.
func (s *Store) OpenPack(num uint32) (*os.File, []Entry, error) {
	f, err := os.Open(s.packPath(num))
	if err != nil {
		return nil, nil, fmt.Errorf("opening %s: %w", packName(num), wrapIO("opening pack", err))
	}
	entries, _, err := readFooter(f)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", packName(num), err)
	}
	return f, entries, nil
}

// PackTail returns the footer and trailer of a pack of size bytes, as
// DecodeFooter takes them, read from the end of the pack file f.
func PackTail(f *os.File, entries []Entry, size int64) ([]byte, error) {
	n := int64(len(entries))*entrySize + trailerSize
	var tr [trailerSize]byte
	if size >= trailerSize {
		if _, err := f.ReadAt(tr[:], size-trailerSize); err != nil {
			return nil, fmt.Errorf("reading pack trailer: %w", err)
		}
		// A packed footer (version 2) is shorter: it ends the pack from
		// its offset on.
		if binary.LittleEndian.Uint32(tr[16:]) == packVersionPacked {
			n = size - int64(min(binary.LittleEndian.Uint64(tr[0:]), uint64(size)))
		}
	}
	if n > size {
		return nil, fmt.Errorf("pack footer of %d bytes in a %d-byte pack: %w", n, size, errdefs.ErrDataLoss)
	}
	tail := make([]byte, n)
	if _, err := f.ReadAt(tail, size-n); err != nil {
		return nil, fmt.Errorf("reading pack footer: %w", err)
	}
	return tail, nil
}

// Unpack decodes the stored bytes of the chunk e describes into dst (which
// must hold ChunkSize bytes, or be nil) and checks them against its id: a
// chunk that does not match is an errdefs.ErrDataLoss error, never data.
func Unpack(e Entry, stored, dst []byte) ([]byte, error) {
	if cap(dst) < ChunkSize {
		dst = make([]byte, ChunkSize)
	}
	if uint32(len(stored)) != e.Stored {
		return nil, fmt.Errorf("chunk %s: %d stored bytes, want %d: %w", e.ID, len(stored), e.Stored, errdefs.ErrDataLoss)
	}
	if err := e.check(uint64(e.Offset) + uint64(e.Stored)); err != nil {
		return nil, fmt.Errorf("chunk %s: %w", e.ID, err)
	}
	out, err := decode(e, stored, dst[:ChunkSize])
	if err == nil && Sum(out) != e.ID {
		err = errors.New("content does not match its id")
	}
	if err != nil {
		return nil, fmt.Errorf("chunk %s is damaged: %w: %w", e.ID, err, errdefs.ErrDataLoss)
	}
	return out, nil
}

// PutStored adds the chunk e describes with its stored bytes as they are,
// without compressing it again: for a chunk that came from another store's
// pack and that Unpack has checked. A chunk the store holds is skipped.
func (w *Writer) PutStored(e Entry, stored []byte) error {
	if err := w.usable(); err != nil {
		return err
	}
	if uint32(len(stored)) != e.Stored || e.Raw != ChunkSize {
		return fmt.Errorf("chunk %s: %d stored bytes of %d, raw %d: %w", e.ID, len(stored), e.Stored, e.Raw, errdefs.ErrInvalidArgument)
	}
	w.stats.Chunks++
	if _, ok := w.pending[e.ID]; ok || w.s.Has(e.ID) {
		w.stats.ReusedChunk++
		return nil
	}
	codec := e.Codec
	if codec == CodecZstd {
		// A frame holds other chunks too: store this one on its own.
		raw, err := Unpack(e, stored, nil)
		if err != nil {
			return w.fail(err)
		}
		stored, codec = encodeChunk(raw, nil)
	}
	if err := w.add(e.ID, stored, codec); err != nil {
		return w.fail(err)
	}
	return nil
}

// noteRead records that pack num is read now.
func (s *Store) noteRead(num uint32) {
	now := time.Now().UnixNano()
	if v, ok := s.lastRead.Load(num); ok {
		v.(*atomic.Int64).Store(now)
		return
	}
	var t atomic.Int64
	t.Store(now)
	s.lastRead.Store(num, &t)
}

// PackUse is a sealed pack and when it was last read: by this process,
// or else when its file last changed.
type PackUse struct {
	PackInfo
	LastRead time.Time
}

// PackUses lists the live sealed packs, least recently read first.
func (s *Store) PackUses() ([]PackUse, error) {
	var out []PackUse
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err != nil || len(k) != 4 {
				return fmt.Errorf("pack record %x: %w", k, errdefs.ErrDataLoss)
			}
			if rec.State == packLive {
				out = append(out, PackUse{PackInfo: PackInfo{Num: beUint32(k), Size: int64(rec.Size), Chunks: rec.Chunks}})
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	for i := range out {
		if v, ok := s.lastRead.Load(out[i].Num); ok {
			out[i].LastRead = time.Unix(0, v.(*atomic.Int64).Load())
		} else if fi, err := os.Stat(s.packPath(out[i].Num)); err == nil {
			out[i].LastRead = fi.ModTime()
		}
	}
	slices.SortFunc(out, func(a, b PackUse) int { return cmp.Or(a.LastRead.Compare(b.LastRead), cmp.Compare(a.Num, b.Num)) })
	return out, nil
}

// Evict removes sealed packs whose chunks another copy of the store holds
// (a bucket): their index entries go first, then their files. It waits for
// the write lock, so no Writer deduplicates against them meanwhile. A
// crash between the two leaves a file the next Open indexes again.
func (s *Store) Evict(nums []uint32) error {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	if err := s.dropPacks(nums); err != nil {
		return wrapIO("evicting packs", err)
	}
	for _, n := range nums {
		err := os.Remove(s.packPath(n))
		s.forget(n)
		s.lastRead.Delete(n)
		if err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("evicting %s: %w", packName(n), err)
		}
	}
	return syncDir(s.packsDir)
}
