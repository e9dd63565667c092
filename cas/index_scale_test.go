package cas

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containerd/errdefs"
	bolt "go.etcd.io/bbolt"
)

// The index at scale, side by side with the bbolt layout it replaced. Run:
//
//	go test -run '^$' -bench IndexScale -benchtime 20x ./cas/
//	BOXD_BENCH_10M=1 go test -run '^$' -bench IndexScale -benchtime 20x -timeout 60m ./cas/
//
// Each layout is built as a store builds it, a pack of scalePackChunks
// chunks at a time (the old one in one bbolt transaction a pack, in id
// order, fill 0.9; the new one a segment a pack, merged in the background).
// Reported: bytes/chunk of the index files, and ns/chunk of LookupMany over a
// restore's batch of 16384 stored chunks (hit) and of Has over absent
// chunks (miss, a Writer's question for new data); for segments, also what
// Open spends checking them (open, ns per indexed chunk).

const (
	scalePackChunks = 8192 // a 32 MiB pack of incompressible chunks
	scaleBatch      = 16384
)

// scaleIDs makes the ids of pack num of a synthetic store, the same for
// every layout.
func scaleIDs(num uint32) []Entry {
	r := rand.NewChaCha8([32]byte{byte(num), byte(num >> 8), byte(num >> 16), 'i', 'd', 'x'})
	out := make([]Entry, scalePackChunks)
	for i := range out {
		_, _ = r.Read(out[i].ID[:])
		out[i].Offset = packHeaderSize + uint32(i)*ChunkSize
		out[i].Stored, out[i].Raw, out[i].Codec = ChunkSize, ChunkSize, CodecRaw
	}
	return out
}

// scaleSample returns batch stored ids, spread over all packs, shuffled.
func scaleSample(packs int) []ID {
	r := rand.New(rand.NewPCG(1, 2))
	ids := make([]ID, 0, scaleBatch)
	per := scaleBatch/packs + 1
	for p := range packs {
		es := scaleIDs(uint32(p))
		for range per {
			ids = append(ids, es[r.IntN(len(es))].ID)
		}
	}
	r.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
	return ids[:scaleBatch]
}

// scaleAbsent returns batch ids that no pack holds.
func scaleAbsent() []ID {
	r := rand.NewChaCha8([32]byte{'a', 'b', 's'})
	ids := make([]ID, scaleBatch)
	for i := range ids {
		_, _ = r.Read(ids[i][:])
	}
	return ids
}

// scaleLayout is one index built for the comparison.
type scaleLayout interface {
	lookupMany(ids []ID) ([]Location, error)
	has(id ID) bool
	bytes() int64
	files() int
	close()
}

// segmentLayout is the index of this package.
type segmentLayout struct{ s *Store }

func buildSegmentLayout(tb testing.TB, dir string, packs int) *segmentLayout {
	x := newChunkIndex(filepath.Join(dir, "index"))
	if _, _, _, err := x.loadSegments(func(uint32) bool { return false }); err != nil {
		tb.Fatal(err)
	}
	x.start(nil)
	for p := range packs {
		g, err := x.writeSegment(packEntries(uint32(p), scaleIDs(uint32(p))))
		if err != nil {
			tb.Fatal(err)
		}
		x.publish([]*segment{g}, []uint32{uint32(p)}, nil)
	}
	if err := x.waitMerges(); err != nil {
		tb.Fatal(err)
	}
	return &segmentLayout{&Store{idx: x}}
}

func (l *segmentLayout) lookupMany(ids []ID) ([]Location, error) { return l.s.LookupMany(ids) }
func (l *segmentLayout) has(id ID) bool                          { return l.s.Has(id) }
func (l *segmentLayout) bytes() int64                            { return l.s.idx.bytes() }
func (l *segmentLayout) close()                                  { l.s.idx.close() }

func (l *segmentLayout) files() int {
	l.s.idx.mu.RLock()
	defer l.s.idx.mu.RUnlock()
	return len(l.s.idx.segs)
}

// bboltLayout is the chunk index as index.db held it before segments: a
// bucket "chunks" of id → 11-byte location, added a pack a transaction.
type bboltLayout struct {
	db   *bolt.DB
	path string
}

func buildBboltLayout(tb testing.TB, dir string, packs int) *bboltLayout {
	path := filepath.Join(dir, "index.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoFreelistSync: true, FreelistType: bolt.FreelistMapType, NoSync: true})
	if err != nil {
		tb.Fatal(err)
	}
	for p := range packs {
		err := db.Update(func(tx *bolt.Tx) error {
			chunks, err := tx.CreateBucketIfNotExists([]byte("chunks"))
			if err != nil {
				return err
			}
			chunks.FillPercent = 0.9
			sorted := scaleIDs(uint32(p))
			slices.SortFunc(sorted, func(a, b Entry) int { return bytes.Compare(a.ID[:], b.ID[:]) })
			for _, e := range sorted {
				if chunks.Get(e.ID[:]) != nil {
					continue
				}
				loc := Location{Pack: uint32(p), Offset: e.Offset, Stored: e.Stored, Codec: e.Codec}
				if err := chunks.Put(e.ID[:], loc.marshal()); err != nil {
					return err
				}
			}
			packs, err := tx.CreateBucketIfNotExists(bucketPacks)
			if err != nil {
				return err
			}
			rec := packRecord{State: packLive, Chunks: scalePackChunks, Size: PackTarget}
			return packs.Put(packKey(uint32(p)), rec.marshal())
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	// Reopen, as a store does after a restart.
	if err := db.Close(); err != nil {
		tb.Fatal(err)
	}
	if db, err = bolt.Open(path, 0o600, &bolt.Options{NoFreelistSync: true, FreelistType: bolt.FreelistMapType}); err != nil {
		tb.Fatal(err)
	}
	return &bboltLayout{db: db, path: path}
}

// lookupMany is LookupMany as it was: sorted, each id once, the cursor
// stepping forward a few keys before seeking from the root.
func (l *bboltLayout) lookupMany(ids []ID) ([]Location, error) {
	order := make([]int32, 0, len(ids))
	for i, id := range ids {
		if id != ZeroID {
			order = append(order, int32(i))
		}
	}
	slices.SortFunc(order, func(a, b int32) int { return bytes.Compare(ids[a][:], ids[b][:]) })
	locs := make([]Location, len(ids))
	err := l.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket([]byte("chunks")).Cursor()
		var prev ID
		var loc Location
		for k, i := range order {
			id := ids[i]
			if k > 0 && id == prev {
				locs[i] = loc
				continue
			}
			var key, v []byte
			if k > 0 {
				for range 4 {
					if key, v = c.Next(); key == nil || bytes.Compare(key, id[:]) >= 0 {
						break
					}
				}
			}
			if key == nil || bytes.Compare(key, id[:]) < 0 {
				key, v = c.Seek(id[:])
			}
			if key == nil || !bytes.Equal(key, id[:]) {
				return fmt.Errorf("chunk %s: %w", id, errdefs.ErrNotFound)
			}
			var err error
			if loc, err = DecodeLocation(v); err != nil {
				return err
			}
			locs[i], prev = loc, id
		}
		return nil
	})
	return locs, err
}

func (l *bboltLayout) has(id ID) bool {
	found := false
	_ = l.db.View(func(tx *bolt.Tx) error {
		found = tx.Bucket([]byte("chunks")).Get(id[:]) != nil
		return nil
	})
	return found
}

func (l *bboltLayout) bytes() int64 {
	fi, err := os.Stat(l.path)
	if err != nil {
		return -1
	}
	return fi.Size()
}

func (l *bboltLayout) close()     { l.db.Close() }
func (l *bboltLayout) files() int { return 1 }

func BenchmarkIndexScale(b *testing.B) {
	sizes := []int{1 << 20}
	if os.Getenv("BOXD_BENCH_10M") != "" {
		sizes = append(sizes, 10<<20)
	} else if !testing.Short() {
		b.Log("BOXD_BENCH_10M unset: 1 Mi chunks only")
	}
	layouts := []struct {
		name  string
		build func(testing.TB, string, int) scaleLayout
	}{
		{"bbolt", func(tb testing.TB, dir string, packs int) scaleLayout { return buildBboltLayout(tb, dir, packs) }},
		{"segments", func(tb testing.TB, dir string, packs int) scaleLayout { return buildSegmentLayout(tb, dir, packs) }},
	}
	absent := scaleAbsent()
	for _, n := range sizes {
		packs := n / scalePackChunks
		hits := scaleSample(packs)
		for _, lay := range layouts {
			name := fmt.Sprintf("chunks=%dMi/index=%s", n>>20, lay.name)
			var l scaleLayout
			built := false
			dir := b.TempDir()
			setup := func(b *testing.B) {
				if !built {
					l = lay.build(b, dir, packs)
					built = true
				}
			}
			b.Run(name+"/size", func(b *testing.B) {
				setup(b)
				for b.Loop() {
				}
				b.ReportMetric(float64(l.bytes())/float64(n), "bytes/chunk")
				b.ReportMetric(float64(l.bytes())/(1<<20), "MiB")
				b.ReportMetric(float64(l.files()), "files")
			})
			if lay.name == "segments" {
				// What Open spends on the index: every segment parsed and checked.
				b.Run(name+"/open", func(b *testing.B) {
					setup(b)
					for b.Loop() {
						x := newChunkIndex(filepath.Join(dir, "index"))
						if _, _, _, err := x.loadSegments(func(uint32) bool { return true }); err != nil {
							b.Fatal(err)
						}
						x.close()
					}
					b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/chunk")
				})
			}
			b.Run(name+"/LookupMany-hit", func(b *testing.B) {
				setup(b)
				for b.Loop() {
					if _, err := l.lookupMany(hits); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(hits)), "ns/chunk")
			})
			b.Run(name+"/Has-hit", func(b *testing.B) {
				setup(b)
				for b.Loop() {
					for _, id := range hits {
						if !l.has(id) {
							b.Fatal("stored chunk not found")
						}
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(hits)), "ns/chunk")
			})
			b.Run(name+"/Has-miss", func(b *testing.B) {
				setup(b)
				for b.Loop() {
					for _, id := range absent {
						if l.has(id) {
							b.Fatal("absent chunk found")
						}
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(absent)), "ns/chunk")
			})
			if built {
				l.close()
			}
		}
	}
}
