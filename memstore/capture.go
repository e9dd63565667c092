package memstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// PageSize is the guest page size memstore works in: one chunk.
const PageSize = cas.ChunkSize

// DefaultMap is the name of the memory map Capture writes and Restore reads.
const DefaultMap = "memory"

// CaptureOptions describe one capture.
type CaptureOptions struct {
	Name   string // the new snapshot
	Parent string // the previous snapshot, or "" for a full capture
	Map    string // the memory map's name (DefaultMap if empty)
	// Dirty names the pages changed since Parent was captured. Nil means
	// capture every page (zero pages are recorded as zero, never stored).
	Dirty  Bitmap
	Labels map[string]string
	// Blobs are written into the same snapshot as maps of kind "state",
	// one per name: a machine's registers and device state.
	Blobs map[string][]byte
	// More, when set, writes further maps into the snapshot before it is
	// committed: a machine's disk changes, so that one snapshot holds the
	// whole machine.
	More func(ctx context.Context, draft *snapshotter.Draft) error
}

// ReadBlob returns the state blob called name of snapshot snap.
func ReadBlob(g *snapshotter.Graph, snap, name string) ([]byte, error) {
	r, err := g.OpenMap(snap, name)
	if err != nil {
		return nil, err
	}
	b := make([]byte, r.Size())
	if _, err := r.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("reading %s of %s: %w", name, snap, err)
	}
	return b, nil
}

// Capture writes the memory in src (size bytes: a mapping of guest RAM as a
// bytes.Reader, or a memory file through io.NewSectionReader) to the store
// and commits it as snapshot opts.Name, a delta against opts.Parent. With a
// dirty bitmap only the dirty pages are read; the others are inherited from
// the parent.
func Capture(ctx context.Context, g *snapshotter.Graph, src io.ReaderAt, size int64, opts CaptureOptions) (snapshotter.Snapshot, error) {
	if opts.Map == "" {
		opts.Map = DefaultMap
	}
	if size%PageSize != 0 {
		return snapshotter.Snapshot{}, fmt.Errorf("memory region of %d bytes is not a whole number of pages: %w", size, errdefs.ErrInvalidArgument)
	}
	if opts.Dirty != nil && opts.Parent == "" {
		return snapshotter.Snapshot{}, fmt.Errorf("a dirty bitmap needs a parent snapshot to inherit the clean pages from: %w", errdefs.ErrInvalidArgument)
	}
	draft, err := g.NewDraft(opts.Parent)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	defer draft.Abort()
	if opts.Dirty == nil {
		_, err = draft.WriteMap(ctx, opts.Map, snapshotter.KindMemory, io.NewSectionReader(src, 0, size), nil)
	} else {
		pages := opts.Dirty.Pages(int(size / PageSize))
		_, err = draft.WriteBlocks(ctx, opts.Map, snapshotter.KindMemory, pages, &pageReader{src: src, pages: pages})
		if err == nil {
			err = draft.SetSize(opts.Map, snapshotter.KindMemory, size)
		}
	}
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("capturing memory: %w", err)
	}
	for name, b := range opts.Blobs {
		if _, err := draft.WriteMap(ctx, name, snapshotter.KindState, bytes.NewReader(b), nil); err != nil {
			return snapshotter.Snapshot{}, fmt.Errorf("storing %s: %w", name, err)
		}
	}
	if opts.More != nil {
		if err := opts.More(ctx, draft); err != nil {
			return snapshotter.Snapshot{}, err
		}
	}
	return draft.Commit(opts.Name, opts.Labels)
}

// pageReader reads the listed pages of src back to back, and nothing else.
type pageReader struct {
	src   io.ReaderAt
	pages []uint64
	i     int // next page
	off   int // bytes of page i already read
}

func (r *pageReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if r.i == len(r.pages) {
			if n == 0 {
				return 0, io.EOF
			}
			return n, nil
		}
		// Read a run of consecutive pages with one call.
		first := r.pages[r.i]
		run := 1
		for r.i+run < len(r.pages) && r.pages[r.i+run] == first+uint64(run) {
			run++
		}
		want := min(len(p)-n, run*PageSize-r.off)
		m, err := r.src.ReadAt(p[n:n+want], int64(first)*PageSize+int64(r.off))
		n += m
		r.off += m
		for r.off >= PageSize {
			r.off -= PageSize
			r.i++
		}
		if err != nil && err != io.EOF {
			return n, err
		}
		if m < want {
			return n, fmt.Errorf("memory source ended at page %d: %w", first, io.ErrUnexpectedEOF)
		}
	}
	return n, nil
}
