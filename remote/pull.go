package remote

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Span tuning: chunks of one pack closer than SpanGap are fetched in one
// range read, up to SpanMax bytes; FetchWorkers range reads run at once.
const (
	SpanGap      = 64 << 10
	SpanMax      = 4 << 20
	FetchWorkers = 4
)

// PullStats says what a pull fetched.
type PullStats struct {
	Snapshots    int           `json:"snapshots"`     // manifests added to the graph
	Chunks       int           `json:"chunks"`        // chunks fetched
	ChunksLocal  int           `json:"chunks_local"`  // chunks the local store had
	Requests     int           `json:"requests"`      // range reads
	FetchedBytes int64         `json:"fetched_bytes"` // bytes those reads returned
	Took         time.Duration `json:"took"`
}

// Pull adds snapshot name and the snapshots it stands on to the local
// graph, each that is not here: the chunks the local store lacks are read
// from the bucket in spans, checked against their ids and stored, then the
// manifests are added, parents first. A chunk that does not match its id
// is an errdefs.ErrDataLoss error and is never stored.
func (r *Remote) Pull(ctx context.Context, name string) (PullStats, error) {
	began := time.Now()
	var st PullStats
	chain, err := r.missing(ctx, name)
	if err != nil || len(chain) == 0 {
		return st, err
	}
	want, err := r.wanted(ctx, chain, &st)
	if err != nil {
		return st, fmt.Errorf("pulling snapshot %q: %w", name, err)
	}
	if err := r.fetch(ctx, want, &st); err != nil {
		return st, fmt.Errorf("pulling snapshot %q: %w", name, err)
	}
	for _, m := range chain {
		if err := r.cfg.Graph.AddManifest(m); err != nil {
			return st, fmt.Errorf("pulling snapshot %q: %w", name, err)
		}
		st.Snapshots++
	}
	st.Took = time.Since(began)
	r.log.Info("remote: pulled", "snapshot", name, "manifests", st.Snapshots, "chunks", st.Chunks, "bytes", st.FetchedBytes, "requests", st.Requests, "took", st.Took)
	return st, nil
}

// wanted returns where the chunks that ms name and the local store lacks
// lie in the bucket, each once; st counts those it has.
func (r *Remote) wanted(ctx context.Context, ms []snapshotter.Manifest, st *PullStats) ([]chunkAt, error) {
	store := r.cfg.Graph.Store()
	var want []chunkAt
	seen := map[cas.ID]bool{}
	indexed := false
	for _, m := range ms {
		ids, err := m.Chunks()
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			if seen[id] {
				continue
			}
			seen[id] = true
			if store.Has(id) {
				st.ChunksLocal++
				continue
			}
			if !indexed {
				if err := r.refreshIndex(ctx); err != nil {
					return nil, err
				}
				indexed = true
			}
			at, ok := r.lookup(id)
			if !ok {
				return nil, fmt.Errorf("snapshot %q: chunk %s is neither here nor in the bucket's index: %w", m.Snapshot.Name, id, errdefs.ErrDataLoss)
			}
			want = append(want, at)
		}
	}
	return want, nil
}

// missing returns the manifests of name and its ancestors that the local
// graph lacks, parents first.
func (r *Remote) missing(ctx context.Context, name string) ([]snapshotter.Manifest, error) {
	return chain(name, func(n string) (bool, error) {
		_, err := r.cfg.Graph.Get(n)
		return err == nil, nil
	}, func(n string) (snapshotter.Manifest, error) { return r.manifest(ctx, n) })
}

// manifest reads the manifest of snapshot name from the bucket.
func (r *Remote) manifest(ctx context.Context, name string) (snapshotter.Manifest, error) {
	var m snapshotter.Manifest
	b, err := r.cfg.Bucket.Get(ctx, snapshotKey(name))
	if err != nil {
		return m, fmt.Errorf("snapshot %q: %w", name, err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("snapshot %q: manifest unreadable: %w: %w", name, err, errdefs.ErrDataLoss)
	}
	if m.Snapshot.Name != name {
		return m, fmt.Errorf("manifest %s names snapshot %q: %w", snapshotKey(name), m.Snapshot.Name, errdefs.ErrDataLoss)
	}
	m.Snapshot.Labels = r.hosted(m.Snapshot.Labels)
	return m, nil
}

// span is one range read: chunks of one pack, by offset.
type span struct {
	pack     string
	off, end int64
	chunks   []cas.Entry
}

// spans groups chunks into range reads.
func spans(want []chunkAt) []span {
	slices.SortFunc(want, func(a, b chunkAt) int {
		return cmp.Or(cmp.Compare(a.pack, b.pack), cmp.Compare(a.entry.Offset, b.entry.Offset))
	})
	var out []span
	for _, c := range want {
		off, end := int64(c.entry.Offset), int64(c.entry.Offset)+int64(c.entry.Stored)
		if n := len(out); n > 0 {
			s := &out[n-1]
			if s.pack == c.pack && off-s.end <= SpanGap && end-s.off <= SpanMax {
				s.end = max(s.end, end)
				s.chunks = append(s.chunks, c.entry)
				continue
			}
		}
		out = append(out, span{pack: c.pack, off: off, end: end, chunks: []cas.Entry{c.entry}})
	}
	return out
}

// fetch reads want from the bucket, FetchWorkers spans at a time, checks
// every chunk and stores it. On an error, chunks stored before it stay
// (unreferenced until a manifest names them).
func (r *Remote) fetch(ctx context.Context, want []chunkAt, st *PullStats) error {
	if len(want) == 0 {
		return nil
	}
	todo := spans(want)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type got struct {
		s    span
		data []byte
		err  error
	}
	jobs := make(chan span)
	results := make(chan got)
	var wg sync.WaitGroup
	for range FetchWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := range jobs {
				data, err := r.cfg.Bucket.GetRange(ctx, packKey(s.pack), s.off, s.end-s.off)
				select {
				case results <- got{s, data, err}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	go func() {
		defer close(jobs)
		for _, s := range todo {
			select {
			case jobs <- s:
			case <-ctx.Done():
				return
			}
		}
	}()
	go func() { wg.Wait(); close(results) }()

	w := r.cfg.Graph.Store().NewWriter()
	var first error
	buf := make([]byte, cas.ChunkSize)
	for g := range results {
		if first != nil {
			continue
		}
		if g.err != nil {
			first = g.err
			cancel()
			continue
		}
		st.Requests++
		st.FetchedBytes += int64(len(g.data))
		for _, e := range g.s.chunks {
			at := int64(e.Offset) - g.s.off
			stored := g.data[at : at+int64(e.Stored)]
			_, err := cas.Unpack(e, stored, buf)
			if err == nil {
				err = w.PutStored(e, stored)
			}
			if err != nil {
				first = fmt.Errorf("remote pack %s: %w", g.s.pack, err)
				cancel()
				break
			}
			st.Chunks++
		}
	}
	if first != nil {
		if errors.Is(first, errdefs.ErrDataLoss) {
			r.log.Error("remote: damaged chunk refused", "err", first)
		}
		return errors.Join(first, w.Commit())
	}
	return w.Commit()
}
