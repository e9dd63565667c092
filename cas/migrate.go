package cas

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	bolt "go.etcd.io/bbolt"
)

// migrateLegacyIndex turns index.db of version 1, which also held every
// chunk's location (about 300 bytes a chunk), into version 2, which holds
// only the pack records. It finishes the deletions GC left pending (the new
// database does not know those packs), writes the live records and the next
// pack number to a fresh database beside the old one, and renames it over the
// old file, so the space of the old locations is returned. Open then finds
// every pack without a segment and builds the segments from the footers. A
// crash before the rename leaves the old database, migrated again next time;
// after it, the new one. old is closed; the new database is returned open.
func migrateLegacyIndex(old *bolt.DB, path, packsDir string, opts *bolt.Options) (*bolt.DB, error) {
	recs := map[uint32]packRecord{}
	var next []byte
	err := old.View(func(tx *bolt.Tx) error {
		if meta := tx.Bucket(bucketMeta); meta != nil {
			if v := meta.Get(keyNextPack); len(v) == 4 {
				next = append(next, v...)
			}
		}
		packs := tx.Bucket(bucketPacks)
		if packs == nil {
			return nil
		}
		return packs.ForEach(func(k, v []byte) error {
			rec, err := decodePackRecord(v)
			if err == nil && len(k) == 4 {
				recs[binary.BigEndian.Uint32(k)] = rec
			}
			return nil // a damaged record: the pack is recorded again from disk
		})
	})
	old.Close()
	if err != nil {
		return nil, fmt.Errorf("migrating index: %w", err)
	}
	for n, rec := range recs {
		if rec.State == packDeleting {
			if err := removeFile(filepath.Join(packsDir, packName(n))); err != nil {
				return nil, fmt.Errorf("migrating index: finishing removal of %s: %w", packName(n), err)
			}
			delete(recs, n)
		}
	}
	if err := syncDir(packsDir); err != nil {
		return nil, fmt.Errorf("migrating index: %w", err)
	}
	tmp := path + ".tmp"
	if err := removeFile(tmp); err != nil {
		return nil, fmt.Errorf("migrating index: %w", err)
	}
	db, err := bolt.Open(tmp, 0o600, opts)
	if err != nil {
		return nil, fmt.Errorf("migrating index: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := initIndex(tx); err != nil {
			return err
		}
		if next != nil {
			if err := tx.Bucket(bucketMeta).Put(keyNextPack, next); err != nil {
				return err
			}
		}
		for n, rec := range recs {
			if err := tx.Bucket(bucketPacks).Put(packKey(n), rec.marshal()); err != nil {
				return err
			}
		}
		return nil
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		_ = os.Remove(tmp)
		return nil, wrapIO("migrating index", err)
	}
	db, err = bolt.Open(path, 0o600, opts)
	if err != nil {
		return nil, fmt.Errorf("migrating index: %w", err)
	}
	return db, nil
}
