package cas

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// rebuildBatch is the most entries a segment rebuilt from pack footers
// holds, which bounds the memory a rebuild sorts in (about 48 MiB).
const rebuildBatch = 1 << 20

// reconcile brings the index in line with the packs on disk: it finishes
// interrupted deletions, records sealed packs index.db does not know (a
// crash between sealing and indexing, or a rebuild), drops the records of
// packs that are gone, opens the index segments, and builds segments from
// the footers of live packs that no segment lists (a crash before a pack's
// segment was written, a damaged segment set aside, a migrated store).
// indexMissing says Open found no index.db, so the packs on disk, if any,
// are recorded afresh: a rebuild.
func (s *Store) reconcile(indexMissing bool) error {
	onDisk, err := s.listPacks(true)
	if err != nil {
		return err
	}
	if indexMissing && len(onDisk) > 0 {
		s.Rebuilt = true
	}
	present := map[uint32]bool{}
	for _, n := range onDisk {
		present[n] = true
	}
	known, next, err := s.readPackRecords()
	if err != nil {
		return err
	}
	var gone []uint32
	for n, rec := range known {
		switch {
		case rec.State == packDeleting:
			if err := removeFile(s.packPath(n)); err != nil {
				return fmt.Errorf("finishing removal of %s: %w", packName(n), err)
			}
			delete(present, n)
			gone = append(gone, n)
		case !present[n]:
			gone = append(gone, n)
		}
	}
	if len(gone) > 0 {
		if err := s.dropPacks(gone); err != nil {
			return err
		}
	}
	footers := map[uint32][]Entry{}
	for _, n := range onDisk {
		next = max(next, n+1)
		if _, ok := known[n]; ok || !present[n] {
			continue
		}
		entries, err := s.recordPackFile(n)
		if errors.Is(err, errdefs.ErrDataLoss) {
			s.Damaged = append(s.Damaged, fmt.Sprintf("%s: %v", packName(n), err))
			continue
		}
		if err != nil {
			return err
		}
		known[n], footers[n] = packRecord{State: packLive}, entries
	}
	live := map[uint32]bool{}
	for n, rec := range known {
		if rec.State == packLive && present[n] {
			live[n] = true
		}
	}
	covered, maxPack, damaged, err := s.idx.loadSegments(func(n uint32) bool { return live[n] })
	if err != nil {
		return err
	}
	if len(damaged) > 0 {
		s.Rebuilt = true
	}
	if maxPack >= int64(next) {
		// A segment may list a pack that is gone: never reuse its number.
		next = uint32(maxPack + 1)
	}
	var uncovered []uint32
	for n := range live {
		if !covered[n] {
			uncovered = append(uncovered, n)
		}
	}
	slices.Sort(uncovered)
	if err := s.rebuildSegments(uncovered, footers, live); err != nil {
		return err
	}
	s.idx.start(slices.Collect(maps.Keys(live)))
	s.nextPack = next
	return nil
}

// readPackRecords reads index.db's pack records and next pack number,
// resetting index.db when a record is damaged.
func (s *Store) readPackRecords() (map[uint32]packRecord, uint32, error) {
	known := map[uint32]packRecord{}
	var next uint32
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyNextPack); len(v) == 4 {
			next = beUint32(v)
		}
		return tx.Bucket(bucketPacks).ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err != nil || len(k) != 4 {
				return fmt.Errorf("pack record %x: %w", k, errdefs.ErrDataLoss)
			}
			known[beUint32(k)] = rec
			return nil
		})
	})
	if errors.Is(err, errdefs.ErrDataLoss) {
		if err := s.resetIndex(); err != nil {
			return nil, 0, err
		}
		return map[uint32]packRecord{}, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("reading index: %w", err)
	}
	return known, next, nil
}

// readPackFooter reads the footer of sealed pack num.
func (s *Store) readPackFooter(num uint32) ([]Entry, int64, error) {
	f, err := os.Open(s.packPath(num))
	if err != nil {
		return nil, 0, fmt.Errorf("opening %s: %w", packName(num), err)
	}
	defer f.Close()
	entries, size, err := readFooter(f)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", packName(num), err)
	}
	return entries, size, nil
}

// recordPackFile records in index.db a sealed pack found on disk, and
// returns its footer's entries.
func (s *Store) recordPackFile(num uint32) ([]Entry, error) {
	entries, size, err := s.readPackFooter(num)
	if err != nil {
		return nil, err
	}
	rec := packRecord{State: packLive, Chunks: uint32(len(entries)), Size: uint64(size)}
	err = s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketPacks).Put(packKey(num), rec.marshal())
	})
	if err != nil {
		return nil, wrapIO("recording "+packName(num), err)
	}
	return entries, nil
}

// rebuildSegments writes segments for the live packs nums from their
// footers (from footers when read already), a batch of packs a segment.
// A pack whose footer is damaged is dropped, named in s.Damaged.
func (s *Store) rebuildSegments(nums []uint32, footers map[uint32][]Entry, live map[uint32]bool) error {
	var batch []indexEntry
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		g, err := s.idx.writeSegment(batch)
		if err != nil {
			return fmt.Errorf("rebuilding index: %w", err)
		}
		s.idx.publish([]*segment{g}, nil, nil)
		batch = batch[:0]
		return nil
	}
	for _, n := range nums {
		entries := footers[n]
		if entries == nil {
			var err error
			entries, _, err = s.readPackFooter(n)
			if errors.Is(err, errdefs.ErrDataLoss) {
				s.Damaged = append(s.Damaged, fmt.Sprintf("%s: %v", packName(n), err))
				delete(live, n)
				if err := s.dropPacks([]uint32{n}); err != nil {
					return err
				}
				continue
			}
			if err != nil {
				return err
			}
		}
		batch = append(batch, packEntries(n, entries)...)
		if len(batch) >= rebuildBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// indexPack adds a sealed pack to the index: its segment, then its record.
// A crash between the two leaves a pack that the next Open records.
func (s *Store) indexPack(num uint32, size int64, entries []Entry) error {
	g, err := s.idx.writeSegment(packEntries(num, entries))
	if err != nil {
		return err
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		rec := packRecord{State: packLive, Chunks: uint32(len(entries)), Size: uint64(size)}
		if err := tx.Bucket(bucketPacks).Put(packKey(num), rec.marshal()); err != nil {
			return err
		}
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(keyNextPack); len(v) == 4 && beUint32(v) > num {
			return nil // a later pack was sealed first
		}
		return meta.Put(keyNextPack, packKey(num+1))
	})
	if err != nil {
		if g != nil {
			g.release()
		}
		return err
	}
	s.idx.publish([]*segment{g}, []uint32{num}, nil)
	return nil
}

// dropPacks removes the records of packs that are gone and takes their
// chunks out of the index (at once for lookups; merges drop the entries).
func (s *Store) dropPacks(nums []uint32) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, n := range nums {
			if err := tx.Bucket(bucketPacks).Delete(packKey(n)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	s.idx.publish(nil, nil, nums)
	return nil
}
