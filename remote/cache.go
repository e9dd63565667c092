package remote

import (
	"context"
	"fmt"
	"time"
)

// EvictStats says what an eviction removed.
type EvictStats struct {
	Packs int   `json:"packs"`
	Bytes int64 `json:"bytes"`
	// Kept is what the store's packs take after it.
	Kept int64 `json:"kept"`
}

// Evict makes the local store a cache of the bucket bounded by limit bytes
// of packs: it removes local packs, least recently read first, until the
// packs take at most limit, of those whose every chunk is in the bucket's
// index. A pack with a chunk the bucket lacks (not pushed yet) is never
// removed, so the store may stay over limit. Fill brings back what a
// snapshot needs.
func (r *Remote) Evict(ctx context.Context, limit int64) (EvictStats, error) {
	var st EvictStats
	store := r.cfg.Graph.Store()
	uses, err := store.PackUses()
	if err != nil {
		return st, err
	}
	for _, u := range uses {
		st.Kept += u.Size
	}
	if st.Kept <= limit {
		return st, nil
	}
	if err := r.refreshIndex(ctx); err != nil {
		return st, err
	}
	var victims []uint32
	for _, u := range uses {
		if st.Kept <= limit {
			break
		}
		if ok, err := r.inBucket(u.Num); err != nil || !ok {
			continue // not pushed, or gone meanwhile: kept
		}
		victims = append(victims, u.Num)
		st.Packs++
		st.Bytes += u.Size
		st.Kept -= u.Size
	}
	if len(victims) == 0 {
		return st, nil
	}
	if err := store.Evict(victims); err != nil {
		return st, err
	}
	r.log.Info("remote: evicted local packs held by the bucket", "packs", st.Packs, "bytes", st.Bytes, "kept", st.Kept, "limit", limit)
	return st, nil
}

// inBucket reports whether every chunk of local pack num is in the
// bucket's index.
func (r *Remote) inBucket(num uint32) (bool, error) {
	f, entries, err := r.cfg.Graph.Store().OpenPack(num)
	if err != nil {
		return false, err
	}
	f.Close()
	for _, e := range entries {
		if _, ok := r.lookup(e.ID); !ok {
			return false, nil
		}
	}
	return true, nil
}

// Fill fetches the chunks that snapshot name and its ancestors name and
// the local store lacks (Evict removed them), as Pull fetches them, so
// that the snapshot restores from the local store.
func (r *Remote) Fill(ctx context.Context, name string) (PullStats, error) {
	began := time.Now()
	var st PullStats
	ms, err := chain(name, func(string) (bool, error) { return false, nil }, r.cfg.Graph.Manifest)
	if err != nil {
		return st, err
	}
	want, err := r.wanted(ctx, ms, &st)
	if err != nil {
		return st, fmt.Errorf("filling snapshot %q: %w", name, err)
	}
	if err := r.fetch(ctx, want, &st); err != nil {
		return st, fmt.Errorf("filling snapshot %q: %w", name, err)
	}
	st.Took = time.Since(began)
	if st.Chunks > 0 {
		r.log.Info("remote: fetched evicted chunks", "snapshot", name, "chunks", st.Chunks, "bytes", st.FetchedBytes, "took", st.Took)
	}
	return st, nil
}
