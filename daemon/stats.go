package daemon

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"

	"github.com/boxd-dev/boxd/box"
	"github.com/containerd/errdefs"
)

// StatsOptions choose the boxes GET /v1/stats measures, and what.
type StatsOptions struct {
	// Boxes names the boxes (query box=, repeated); none means every box
	// that has a machine (running or paused), or every box with All.
	Boxes []string
	All   bool // query all=1
	// Store adds each box's store figures (query store=1), which the box
	// manager measures again only when the snapshots have changed.
	Store bool
}

func (o StatsOptions) query() url.Values {
	q := url.Values{"box": o.Boxes}
	if o.All {
		q.Set("all", "1")
	}
	if o.Store {
		q.Set("store", "1")
	}
	return q
}

// stats answers what boxes use of the host (box.Manager.Usage): the boxes
// named by ?box=, else those with a machine, else every one with ?all=1.
// A client works out CPU shares from two answers.
func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	opts, err := statsOptions(r.URL.Query())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	us, err := s.mgr.Usage(r.Context(), opts.Boxes, box.UsageOptions{Store: opts.Store})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := []box.Usage{}
	for _, u := range us {
		if len(opts.Boxes) > 0 || opts.All || u.State == box.StateRunning || u.State == box.StatePaused {
			out = append(out, u)
		}
	}
	s.reply(w, out)
}

// statsOptions reads and checks the query of GET /v1/stats.
func statsOptions(q url.Values) (StatsOptions, error) {
	opts := StatsOptions{Boxes: q["box"]}
	for _, n := range opts.Boxes {
		if err := box.ValidateName(n); err != nil {
			return opts, err
		}
	}
	for key, dst := range map[string]*bool{"all": &opts.All, "store": &opts.Store} {
		if v := q.Get(key); v != "" {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return opts, fmt.Errorf("stats: %s=%q: want 1 or 0: %w", key, v, errdefs.ErrInvalidArgument)
			}
			*dst = b
		}
	}
	return opts, nil
}

// Stats returns what boxes use of the host now (see StatsOptions).
func (c *Client) Stats(ctx context.Context, opts StatsOptions) ([]box.Usage, error) {
	var out []box.Usage
	return out, c.do(ctx, http.MethodGet, "/v1/stats?"+opts.query().Encode(), nil, &out)
}
