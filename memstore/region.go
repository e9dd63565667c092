package memstore

import (
	"context"
	"fmt"
	"sync"

	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// Restore is an in-process lazy restore: region is registered with a new
// userfaultfd and served by a handler goroutine on its own thread.
type Restore struct {
	*Server
	fd     *uffd.FD
	region []byte
	g      *snapshotter.Graph
	snap   string
	m      string

	closeOnce sync.Once
}

// Start restores map m of snapshot snap into region, which must be private
// anonymous memory (mmap'd by the caller, page-aligned, not yet touched) no
// larger than the map. Pages are filled when first touched; the working set
// recorded by an earlier restore of snap or of an ancestor is prefetched
// unless opts.Prefetch is set (to a list, or to an empty non-nil slice for
// none). If serving fails, the region is made inaccessible: a thread that
// touches a page that could not be served gets a fault, never wrong data.
//
// The handler is a goroutine of this process, which puts two rules on Go
// code that touches region itself (a vCPU thread inside KVM_RUN, or the
// kernel copying into region during a system call, is not affected):
//   - leave a P free for the handler: GOMAXPROCS above the number of
//     goroutines that may fault at once, since a thread blocked in a fault
//     keeps its P;
//   - fault pages in with plain loads and stores in Go code, never inside
//     runtime assembly (copy, bytes.Equal, clear): a goroutine blocked in a
//     fault there cannot be stopped for a garbage collection, which then
//     waits for it while the handler waits for the collection. A handler
//     in another process (Serve) has neither constraint.
func Start(ctx context.Context, g *snapshotter.Graph, snap, m string, region []byte, opts Options) (*Restore, error) {
	if m == "" {
		m = DefaultMap
	}
	if len(region) == 0 || len(region)%PageSize != 0 || uffd.Addr(region)%PageSize != 0 {
		return nil, fmt.Errorf("region must be page-aligned and a non-empty whole number of pages: %w", errdefs.ErrInvalidArgument)
	}
	r, err := g.OpenMap(snap, m)
	if err != nil {
		return nil, err
	}
	if opts.Prefetch == nil {
		ws, _, err := g.WorkingSet(snap, m)
		if err != nil {
			return nil, err
		}
		opts.Prefetch = ws
	}
	fd, err := uffd.New()
	if err != nil {
		return nil, err
	}
	base := uffd.Addr(region)
	if err := fd.Register(base, uintptr(len(region))); err != nil {
		fd.Close()
		return nil, err
	}
	inaccessible := func() { _ = unix.Mprotect(region, unix.PROT_NONE) }
	s, err := newServer(ctx, fd, []span{{base: base, pages: len(region) / PageSize}}, g, snap, m, r, opts, inaccessible)
	if err != nil {
		fd.Close()
		return nil, err
	}
	return &Restore{Server: s, fd: fd, region: region, g: g, snap: snap, m: m}, nil
}

// SaveWorkingSet keeps the pages faulted so far with the snapshot, for the
// next restore to prefetch.
func (r *Restore) SaveWorkingSet() error {
	return r.g.SetWorkingSet(r.snap, r.m, r.WorkingSet())
}

// Close stops serving and unregisters the region. Pages not yet touched
// read as zero afterwards, so call it only when the region is done with
// (or fully populated). It returns the error that ended serving, if any.
// It may be called more than once.
func (r *Restore) Close() error {
	r.closeOnce.Do(func() {
		r.Shutdown()
		if r.Err() == nil {
			_ = r.fd.Unregister(uffd.Addr(r.region), uintptr(len(r.region)))
		}
		r.fd.Close()
	})
	return r.Err()
}
