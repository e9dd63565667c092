package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/containerd/errdefs"
)

// CompactInterval is a quiet spell that suits Config.CompactAfter (which is
// off unless set: compacted packs make random page reads slower).
const CompactInterval = 30 * time.Second

// CompactRequest is the body of POST /v1/compact. The body may be left
// out: a request without one compacts with the store's defaults.
type CompactRequest struct {
	// FrameChunks is the most chunks one zstd frame holds, 1 to
	// cas.MaxFrameChunks (0 means the store's default).
	FrameChunks int `json:"frame_chunks,omitempty"`
}

// options checks req and returns the compaction options it asks for.
func (req CompactRequest) options() (cas.CompactOptions, error) {
	if req.FrameChunks < 0 || req.FrameChunks > cas.MaxFrameChunks {
		return cas.CompactOptions{}, fmt.Errorf("compact frame_chunks %d is outside 1-%d: %w", req.FrameChunks, cas.MaxFrameChunks, errdefs.ErrInvalidArgument)
	}
	return cas.CompactOptions{FrameChunks: req.FrameChunks}, nil
}

// compact recompresses the packs written since the last compaction, with
// the options of the request's body (the defaults when it has none).
func (s *Server) compact(w http.ResponseWriter, r *http.Request) {
	var req CompactRequest
	if err := decode(w, r, maxRequestBody, &req); err != nil && !errors.Is(err, io.EOF) {
		s.fail(w, r, err)
		return
	}
	opts, err := req.options()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	st, err := s.graph.Compact(ctx, opts)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

// noteRequests records when each request arrives.
func (s *Server) noteRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.lastRequest.Store(s.now().UnixNano())
		next.ServeHTTP(w, r)
	})
}

// CompactIdle compacts the store's fresh packs, one at a time, while the
// API has been quiet for at least quiet. Each pack holds the store's write
// lock for the second or so it takes, so a snapshot that arrives waits at
// most that long; a request that arrives stops it after the pack in hand.
// It returns what it did.
func (s *Server) CompactIdle(ctx context.Context, quiet time.Duration) (cas.CompactStats, error) {
	var total cas.CompactStats
	for ctx.Err() == nil {
		if s.now().Sub(time.Unix(0, s.lastRequest.Load())) < quiet {
			break
		}
		st, err := s.graph.Compact(ctx, cas.CompactOptions{MaxPacks: 1})
		total.PacksCompacted += st.PacksCompacted
		total.PacksWritten += st.PacksWritten
		total.PacksSkipped += st.PacksSkipped
		total.BytesBefore += st.BytesBefore
		total.BytesAfter += st.BytesAfter
		total.Seconds += st.Seconds
		total.PacksLeft = st.PacksLeft
		if err != nil {
			return total, err
		}
		if st.PacksLeft == 0 || st.PacksCompacted == 0 {
			break
		}
	}
	return total, nil
}

// CompactLoop calls CompactIdle every interval, with interval as the quiet
// spell, until ctx ends. interval <= 0 returns at once.
func (s *Server) CompactLoop(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		return
	}
	every(ctx, interval, func() {
		st, err := s.CompactIdle(ctx, interval)
		if err != nil && ctx.Err() == nil {
			s.log.Warn("background compaction", "err", err)
		}
		if st.PacksCompacted > 0 {
			s.log.Info("background compaction", "packs", st.PacksCompacted, "bytes_before", st.BytesBefore, "bytes_after", st.BytesAfter, "seconds", st.Seconds, "packs_left", st.PacksLeft)
		}
	})
}

// every calls f every interval until ctx ends.
func every(ctx context.Context, interval time.Duration, f func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}
