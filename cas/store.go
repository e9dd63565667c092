package cas

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/s2"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Store is a content-addressed chunk store in one directory. Its methods are
// safe for concurrent use; at most one Writer exists at a time.
type Store struct {
	dir      string
	packsDir string
	db       *bolt.DB
	idx      *chunkIndex
	lock     *os.File

	// writeMu is held by the one Writer (and by GC) for its whole life.
	writeMu sync.Mutex

	// filesMu protects files and nextPack.
	filesMu  sync.RWMutex
	files    map[uint32]*os.File
	nextPack uint32

	// frames holds recently decoded zstd frames.
	frames frameCache

	// lastRead maps a pack number to when it was last read
	// (*atomic.Int64, Unix nanoseconds), for eviction (PackUses).
	lastRead sync.Map

	// closed is set by Close: a lookup that misses then says so rather
	// than that the chunk is not stored.
	closed atomic.Bool

	// moves counts the index switches that moved chunks (Moves).
	moves atomic.Uint64

	// Rebuilt reports whether Open rebuilt the index from the pack footers.
	Rebuilt bool
	// Damaged lists packs whose footers could not be read when the index was
	// reconciled; their chunks are not indexed. Verify reports them too.
	Damaged []string
}

// Options tune Open.
type Options struct {
	// LockTimeout bounds the wait for another process holding the store.
	LockTimeout time.Duration
}

// Open opens or creates the store in dir. It takes an exclusive lock on the
// store, removes unfinished packs, and reconciles the index with the packs on
// disk, rebuilding what is missing or unreadable, and migrating an index of
// an earlier version.
func Open(dir string, opts Options) (*Store, error) {
	if opts.LockTimeout == 0 {
		opts.LockTimeout = time.Second
	}
	s := &Store{dir: dir, packsDir: filepath.Join(dir, "packs"), files: map[uint32]*os.File{}}
	if err := os.MkdirAll(s.packsDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating store in %s: %w", dir, err)
	}
	lock, err := lockStore(dir, opts.LockTimeout)
	if err != nil {
		return nil, err
	}
	s.lock = lock
	s.idx = newChunkIndex(filepath.Join(dir, "index"))
	indexMissing, err := s.openDB(opts)
	if err != nil {
		s.lock.Close()
		return nil, err
	}
	if err := s.reconcile(indexMissing); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// openDB opens index.db, recreating it when it is unreadable and migrating
// it from version 1. It reports whether the file was missing.
func (s *Store) openDB(opts Options) (missing bool, err error) {
	dbPath := filepath.Join(s.dir, "index.db")
	_, statErr := os.Stat(dbPath)
	missing = errors.Is(statErr, fs.ErrNotExist)
	db, err := bolt.Open(dbPath, 0o600, boltOptions(opts))
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return false, fmt.Errorf("store %s is in use by another process: %w", s.dir, errdefs.ErrUnavailable)
	case err != nil && isAccessError(err):
		// Not damage: the index is fine, we may not open it.
		return false, fmt.Errorf("opening index: %w", err)
	case err != nil:
		// Unreadable index: keep it aside for inspection and rebuild.
		_ = os.Rename(dbPath, dbPath+".damaged")
		db, err = bolt.Open(dbPath, 0o600, boltOptions(opts))
		if err != nil {
			return false, fmt.Errorf("recreating index: %w", err)
		}
		s.Rebuilt = true
	}
	s.db = db
	err = db.Update(initIndex)
	switch {
	case err == nil:
		return missing, nil
	case errors.Is(err, errLegacyIndex):
		s.Rebuilt = true
		if s.db, err = migrateLegacyIndex(db, dbPath, s.packsDir, boltOptions(opts)); err != nil {
			return false, err
		}
		return missing, nil
	case errors.Is(err, errdefs.ErrDataLoss):
		if err := s.resetIndex(); err != nil {
			db.Close()
			return false, err
		}
		return missing, nil
	default:
		db.Close()
		return false, wrapIO("initialising index", err)
	}
}

// boltOptions are the options index.db is opened with.
func boltOptions(opts Options) *bolt.Options {
	return &bolt.Options{Timeout: opts.LockTimeout, NoFreelistSync: true, FreelistType: bolt.FreelistMapType}
}

// isAccessError reports an error opening a file that says nothing about its
// content: no permission, or a folder gone.
func isAccessError(err error) bool {
	return errors.Is(err, fs.ErrPermission) || errors.Is(err, os.ErrNotExist)
}

// resetIndex empties the index so reconcile rebuilds it from the packs.
func (s *Store) resetIndex() error {
	s.Rebuilt = true
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketPacks, bucketMeta} {
			if tx.Bucket(name) != nil {
				if err := tx.DeleteBucket(name); err != nil {
					return err
				}
			}
		}
		return initIndex(tx)
	})
}

// Moves counts the times GC or compaction moved chunks to other packs
// since Open. A location looked up while it had one value may be stale
// once it has another (a read of it then fails, and a fresh look-up finds
// the chunk), and a chunk may have changed codec: a caller that keeps
// locations compares it to know when to look them up again.
func (s *Store) Moves() uint64 { return s.moves.Load() }

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

// Close closes the index and every open pack. It waits for a merge of
// index segments in progress to stop.
func (s *Store) Close() error {
	s.closed.Store(true)
	s.idx.close()
	s.filesMu.Lock()
	for n, f := range s.files {
		f.Close()
		delete(s.files, n)
	}
	s.filesMu.Unlock()
	err := s.db.Close()
	s.lock.Close()
	return err
}

// packPath returns the path of pack num.
func (s *Store) packPath(num uint32) string { return filepath.Join(s.packsDir, packName(num)) }

// listPacks returns the sealed packs on disk. With removeTmp (Open, before
// any Writer exists) it also removes unfinished ones; other callers must
// not, as a Writer's pack in progress is one.
func (s *Store) listPacks(removeTmp bool) ([]uint32, error) {
	ents, err := os.ReadDir(s.packsDir)
	if err != nil {
		return nil, fmt.Errorf("listing packs: %w", err)
	}
	var nums []uint32
	for _, e := range ents {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			if removeTmp {
				_ = os.Remove(filepath.Join(s.packsDir, name))
			}
			continue
		}
		var n uint32
		if _, err := fmt.Sscanf(name, "pack-%08x.pack", &n); err == nil && name == packName(n) {
			nums = append(nums, n)
		}
	}
	sort.Slice(nums, func(i, j int) bool { return nums[i] < nums[j] })
	return nums, nil
}

// Lookup returns where a chunk is stored.
func (s *Store) Lookup(id ID) (Location, error) {
	loc, ok := s.idx.lookup(id)
	if !ok {
		return Location{}, s.missing(id)
	}
	return loc, nil
}

// LookupMany returns the locations of ids in one consistent view of the
// index (zero chunks get a zero Location). It fails on the first id that is
// not stored, naming it.
func (s *Store) LookupMany(ids []ID) ([]Location, error) {
	locs := make([]Location, len(ids))
	missing := -1
	s.idx.read(func(find func(*ID) (Location, bool)) {
		for i := range ids {
			if ids[i] == ZeroID {
				continue
			}
			loc, ok := find(&ids[i])
			if !ok {
				missing = i
				return
			}
			locs[i] = loc
		}
	})
	if missing >= 0 {
		return nil, s.missing(ids[missing])
	}
	return locs, nil
}

// ErrClosed says the store was closed.
var ErrClosed = fmt.Errorf("the chunk store is closed: %w", errdefs.ErrUnavailable)

// missing is the error for a chunk the index does not hold.
func (s *Store) missing(id ID) error {
	if s.closed.Load() {
		return fmt.Errorf("chunk %s: %w", id, ErrClosed)
	}
	return fmt.Errorf("chunk %s: %w", id, errdefs.ErrNotFound)
}

// Has reports whether a chunk is stored (the zero chunk always is).
func (s *Store) Has(id ID) bool {
	if id == ZeroID {
		return true
	}
	_, ok := s.idx.lookup(id)
	return ok
}

// file returns the open pack file num, and notes that it was read now.
func (s *Store) file(num uint32) (*os.File, error) {
	s.noteRead(num)
	s.filesMu.RLock()
	f := s.files[num]
	s.filesMu.RUnlock()
	if f != nil {
		return f, nil
	}
	s.filesMu.Lock()
	defer s.filesMu.Unlock()
	if f := s.files[num]; f != nil {
		return f, nil
	}
	f, err := os.Open(s.packPath(num))
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", packName(num), err)
	}
	s.files[num] = f
	return f, nil
}

// forget closes pack num's file once it has been removed.
func (s *Store) forget(num uint32) {
	s.filesMu.Lock()
	if f := s.files[num]; f != nil {
		f.Close()
		delete(s.files, num)
	}
	s.filesMu.Unlock()
}

// Get returns the chunk id, read into dst (which must hold ChunkSize bytes,
// or be nil). The bytes are re-hashed: a damaged chunk is an errdefs.ErrDataLoss error
// naming the chunk and its pack, never wrong data.
func (s *Store) Get(id ID, dst []byte) ([]byte, error) {
	if cap(dst) < ChunkSize {
		dst = make([]byte, ChunkSize)
	}
	dst = dst[:ChunkSize]
	if id == ZeroID {
		clear(dst)
		return dst, nil
	}
	loc, err := s.Lookup(id)
	if err != nil {
		return nil, err
	}
	for {
		out, err := s.read(id, loc, dst)
		if err == nil {
			return out, nil
		}
		// GC may have moved the chunk and removed its old pack between
		// the lookup and the read: read it from where it is now.
		again, lerr := s.Lookup(id)
		if lerr != nil {
			return nil, lerr
		}
		if again == loc {
			return nil, err
		}
		loc = again
	}
}

// read fetches, decodes and checks one chunk. It holds filesMu for reading
// so GC cannot close the file under it.
func (s *Store) read(id ID, loc Location, dst []byte) ([]byte, error) {
	if loc.Codec == CodecZstd {
		return s.readFramed(id, loc, dst)
	}
	f, err := s.file(loc.Pack)
	if err != nil {
		return nil, err
	}
	var stored []byte
	if loc.Codec == CodecRaw {
		stored = dst[:loc.Stored]
	} else {
		// The stored bytes go through a pooled buffer: one on the stack
		// escapes (ReadAt), and a chunk read would allocate 4 KiB.
		buf := storedBufs.Get().(*[ChunkSize]byte)
		defer storedBufs.Put(buf)
		stored = buf[:loc.Stored]
	}
	s.filesMu.RLock()
	_, err = f.ReadAt(stored, int64(loc.Offset))
	s.filesMu.RUnlock()
	if err != nil {
		return nil, fmt.Errorf("reading chunk %s from %s: %w", id, packName(loc.Pack), err)
	}
	return decodeChecked(id, loc, stored, dst)
}

// storedBufs holds buffers for the stored bytes of one compressed chunk.
var storedBufs = sync.Pool{New: func() any { return new([ChunkSize]byte) }}

// runBufs holds buffers for the stored bytes of runs of chunks that lie
// back to back in a pack (GetLocated), so that reading runs allocates
// nothing once a buffer has grown to the runs read.
var runBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledRun is the largest run buffer kept in runBufs.
const maxPooledRun = 1 << 20

// decodeChecked decodes a chunk's stored bytes into dst and checks them
// against the id.
func decodeChecked(id ID, loc Location, stored, dst []byte) ([]byte, error) {
	out, err := decode(loc.entry(), stored, dst)
	if err == nil && sha256.Sum256(out) != id {
		err = errMismatch
	}
	if err != nil {
		return nil, damaged(id, loc, err)
	}
	return out, nil
}

// errMismatch says that a chunk's content does not hash to its id.
var errMismatch = errors.New("content does not match its id")

// damaged is the error for a chunk whose stored bytes are wrong.
func damaged(id ID, loc Location, err error) error {
	return fmt.Errorf("chunk %s in %s at offset %d is damaged: %w: %w", id, packName(loc.Pack), loc.Offset, err, errdefs.ErrDataLoss)
}

// decodeRun decodes the chunks of a run (stored back to back in run, the
// first at locs[0].Offset) into dst, chunk k at dst[k*ChunkSize:], and
// checks them against ids, two at a time (sum2).
func decodeRun(ids []ID, locs []Location, run, dst []byte) error {
	for k := range ids {
		lo := locs[k].Offset - locs[0].Offset
		out := dst[k*ChunkSize : (k+1)*ChunkSize]
		got, err := decode(locs[k].entry(), run[lo:lo+locs[k].Stored], out)
		if err != nil {
			return damaged(ids[k], locs[k], err)
		}
		if &got[0] != &out[0] {
			copy(out, got)
		}
	}
	k := 0
	for ; k+1 < len(ids); k += 2 {
		a, b := sum2((*[ChunkSize]byte)(dst[k*ChunkSize:]), (*[ChunkSize]byte)(dst[(k+1)*ChunkSize:]))
		if a != ids[k] {
			return damaged(ids[k], locs[k], errMismatch)
		}
		if b != ids[k+1] {
			return damaged(ids[k+1], locs[k+1], errMismatch)
		}
	}
	if k < len(ids) && sha256.Sum256(dst[k*ChunkSize:(k+1)*ChunkSize]) != ids[k] {
		return damaged(ids[k], locs[k], errMismatch)
	}
	return nil
}

// GetMany reads the chunks ids into dst, chunk i at dst[i*ChunkSize:], as
// Get does for each. Chunks that lie back to back in a pack are read with one
// system call, which makes reading a freshly written image sequential.
func (s *Store) GetMany(ids []ID, dst []byte) error {
	if len(dst) < len(ids)*ChunkSize {
		return fmt.Errorf("GetMany: %d chunks need %d bytes, have %d: %w", len(ids), len(ids)*ChunkSize, len(dst), errdefs.ErrInvalidArgument)
	}
	locs, err := s.LookupMany(ids)
	if err != nil {
		return err
	}
	return s.GetLocated(ids, locs, dst)
}

// GetLocated is GetMany for callers that looked the locations up already
// (Lookup), such as a restore that resolves a whole memory map once. A chunk
// that GC moved since is looked up again.
func (s *Store) GetLocated(ids []ID, locs []Location, dst []byte) error {
	if len(locs) != len(ids) || len(dst) < len(ids)*ChunkSize {
		return fmt.Errorf("GetLocated: %d ids, %d locations, %d bytes: %w", len(ids), len(locs), len(dst), errdefs.ErrInvalidArgument)
	}
	var run *[]byte
	defer func() {
		if run != nil && cap(*run) <= maxPooledRun {
			runBufs.Put(run)
		}
	}()
	for i := 0; i < len(ids); {
		out := dst[i*ChunkSize : (i+1)*ChunkSize]
		if ids[i] == ZeroID {
			clear(out)
			i++
			continue
		}
		// Extend the run while the next chunk follows this one in the pack.
		j, end := i+1, locs[i].Offset+locs[i].Stored
		// Framed chunks go one at a time, through the frame cache.
		for j < len(ids) && ids[j] != ZeroID && locs[j].Pack == locs[i].Pack && locs[j].Offset == end && locs[i].Codec != CodecZstd && locs[j].Codec != CodecZstd {
			end += locs[j].Stored
			j++
		}
		if j == i+1 {
			if _, err := s.read(ids[i], locs[i], out); err != nil {
				if _, err := s.Get(ids[i], out); err != nil {
					return err
				}
			}
			i++
			continue
		}
		f, err := s.file(locs[i].Pack)
		if err != nil {
			return err
		}
		n := int(end - locs[i].Offset)
		if run == nil {
			run = runBufs.Get().(*[]byte)
		}
		if cap(*run) < n {
			*run = make([]byte, n)
		}
		buf := (*run)[:n]
		s.filesMu.RLock()
		_, err = f.ReadAt(buf, int64(locs[i].Offset))
		s.filesMu.RUnlock()
		if err != nil {
			// A moved chunk or a short file: fall back to one at a time.
			for k := i; k < j; k++ {
				if _, err := s.Get(ids[k], dst[k*ChunkSize:(k+1)*ChunkSize]); err != nil {
					return err
				}
			}
			i = j
			continue
		}
		if err := decodeRun(ids[i:j], locs[i:j], buf, dst[i*ChunkSize:j*ChunkSize]); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// decode turns the stored bytes of the chunk e describes into the raw
// chunk, in dst: for a framed chunk, stored is the whole frame.
func decode(e Entry, stored, dst []byte) ([]byte, error) {
	switch e.Codec {
	case CodecRaw:
		if len(stored) != ChunkSize {
			return nil, fmt.Errorf("raw chunk of %d bytes", len(stored))
		}
		if &stored[0] != &dst[0] {
			copy(dst, stored)
		}
		return dst[:ChunkSize], nil
	case CodecS2:
		n, err := s2.DecodedLen(stored)
		if err != nil {
			return nil, err
		}
		if n != ChunkSize {
			return nil, fmt.Errorf("decodes to %d bytes", n)
		}
		return s2.Decode(dst[:ChunkSize], stored)
	case CodecZstd:
		if e.Frame == 0 || e.Slot >= e.Frame {
			return nil, fmt.Errorf("frame slot %d of %d", e.Slot, e.Frame)
		}
		raw, err := decodeFrameOnce(stored, int(e.Frame))
		if err != nil {
			return nil, err
		}
		copy(dst[:ChunkSize], raw[int(e.Slot)*ChunkSize:])
		return dst[:ChunkSize], nil
	}
	return nil, fmt.Errorf("unknown codec %d", e.Codec)
}
