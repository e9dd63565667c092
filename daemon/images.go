package daemon

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Images is what the API needs to list and build images (GraphImages on
// the daemon's store).
type Images interface {
	List() ([]guest.Image, error)
	Get(name string) (guest.Image, error)
	// Build builds an image as guest.BuildImage does, telling
	// opts.Progress how far it is.
	Build(ctx context.Context, opts guest.BuildOptions) (guest.Image, error)
}

// GraphImages is Images on a store: guest's image functions on g.
//
// Building while boxes run is safe: the graph may be written by several
// goroutines, guest serialises the builds of one process, and the root's
// build folders (ROOT/cache/rootfs, ROOT/cache/build) belong to the one
// process that holds the store, the daemon. A build makes no mounts: the
// disk is made by mkfs.ext4 -d from a staged copy of the tree.
type GraphImages struct {
	Graph *snapshotter.Graph
}

// List returns the images in the store, by name.
func (i GraphImages) List() ([]guest.Image, error) { return guest.ListImages(i.Graph) }

// Get returns image name.
func (i GraphImages) Get(name string) (guest.Image, error) { return guest.GetImage(i.Graph, name) }

// Build builds an image into the store (see guest.BuildImage).
func (i GraphImages) Build(ctx context.Context, opts guest.BuildOptions) (guest.Image, error) {
	return guest.BuildImage(ctx, i.Graph, opts)
}

// ImageBuildRequest is the body of POST /v1/images: guest.BuildOptions
// without the callbacks.
type ImageBuildRequest struct {
	Name    string `json:"name,omitempty"` // "" means guest.DefaultImage
	Size    int64  `json:"size,omitempty"` // bytes; 0 means guest.DefaultSize
	Mirror  string `json:"mirror,omitempty"`
	Rebuild bool   `json:"rebuild,omitempty"`
	Refetch bool   `json:"refetch,omitempty"`
	// Tree is a root filesystem tree to build from, an absolute path on
	// the daemon's host.
	Tree string `json:"tree,omitempty"`
}

// ImageBuildResult is how a build that succeeded ends.
type ImageBuildResult struct {
	Image guest.Image `json:"image"`
	// Existed says the image was in the store already: nothing was built.
	Existed bool `json:"existed,omitempty"`
}

// BuildProgress is how far a build is: a stage and its measures, as
// guest.BuildOptions.Progress tells them.
type BuildProgress struct {
	Stage string `json:"stage"`
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
}

// imageLine is one line of POST /v1/images's answer: progress, or, last,
// the result or the error that ended the build.
type imageLine struct {
	Progress *BuildProgress    `json:"progress,omitempty"`
	Result   *ImageBuildResult `json:"result,omitempty"`
	Error    string            `json:"error,omitempty"`
	Category string            `json:"category,omitempty"`
}

// progressInterval is how often a build's progress is sent at most.
const progressInterval = 100 * time.Millisecond

// imageBuilds runs the daemon's image builds. A build runs under the
// daemon's context, not its request's: a client that goes away leaves it
// to finish, and the image is in the store afterwards; the daemon stopping
// cancels it, and a cancelled build leaves nothing half made (guest removes
// its staged tree, its disk file and a partial debootstrap tree; the
// snapshot is written last). A request for an image being built joins that
// build and is told its progress from the start; a rebuild of an image
// being built is refused.
type imageBuilds struct {
	images Images // nil: this server builds no images
	ctx    context.Context
	log    *slog.Logger
	wg     sync.WaitGroup // the builds running

	// mu protects the fields below.
	mu      sync.Mutex
	running map[string]*imageBuild
	closed  bool // WaitBuilds was called: no build starts
}

// imageBuild is one build in progress, or done.
type imageBuild struct {
	name  string
	began time.Time
	done  chan struct{} // closed when the build has ended; img and err are set then
	img   guest.Image
	err   error

	// mu protects steps.
	mu sync.Mutex
	// steps is the latest progress of each stage so far, in order.
	steps []BuildProgress
}

func newImageBuilds(ctx context.Context, images Images, log *slog.Logger) *imageBuilds {
	return &imageBuilds{images: images, ctx: ctx, log: log, running: map[string]*imageBuild{}}
}

// report is the build's guest.BuildOptions.Progress.
func (b *imageBuild) report(stage string, done, total int64) {
	p := BuildProgress{Stage: stage, Done: done, Total: total}
	b.mu.Lock()
	defer b.mu.Unlock()
	if n := len(b.steps); n > 0 && b.steps[n-1].Stage == stage {
		b.steps[n-1] = p
		return
	}
	b.steps = append(b.steps, p)
}

// progress returns the steps from the from-th on.
func (b *imageBuild) progress(from int) []BuildProgress {
	b.mu.Lock()
	defer b.mu.Unlock()
	if from >= len(b.steps) {
		return nil
	}
	return append([]BuildProgress(nil), b.steps[from:]...)
}

// start returns the build of image name in progress, joined, or a build
// of it started with opts.
func (ib *imageBuilds) start(name string, opts guest.BuildOptions) (b *imageBuild, joined bool, err error) {
	ib.mu.Lock()
	defer ib.mu.Unlock()
	if b := ib.running[name]; b != nil {
		if opts.Rebuild || opts.Refetch {
			return nil, false, fmt.Errorf("image %s is being built (for %s); a rebuild does not join it: run it again once that build ends: %w",
				name, time.Since(b.began).Round(time.Second), errdefs.ErrFailedPrecondition)
		}
		ib.log.Info("joining the build of image in progress", "image", name)
		return b, true, nil
	}
	if ib.closed || ib.ctx.Err() != nil {
		return nil, false, fmt.Errorf("the daemon is stopping; image %s is not built: %w", name, errdefs.ErrUnavailable)
	}
	b = &imageBuild{name: name, began: time.Now(), done: make(chan struct{})}
	opts.Progress = b.report
	ib.running[name] = b
	ib.wg.Add(1)
	go ib.run(b, opts)
	return b, false, nil
}

func (ib *imageBuilds) run(b *imageBuild, opts guest.BuildOptions) {
	defer ib.wg.Done()
	ib.log.Info("building image", "image", b.name, "tree", opts.Tree, "rebuild", opts.Rebuild || opts.Refetch, "refetch", opts.Refetch)
	img, err := ib.images.Build(ib.ctx, opts)
	if err != nil && ib.ctx.Err() != nil {
		err = fmt.Errorf("the daemon stopped while building image %s: %w", b.name, errors.Join(err, errdefs.ErrUnavailable))
	}
	if err != nil {
		ib.log.Error("image build failed", "image", b.name, "err", err)
	} else {
		ib.log.Info("image built", "image", b.name, "snapshot", img.Snapshot, "size", img.Size, "took", time.Since(b.began).Round(time.Millisecond))
	}
	ib.mu.Lock()
	delete(ib.running, b.name)
	ib.mu.Unlock()
	b.img, b.err = img, err
	close(b.done)
}

// WaitBuilds waits for the image builds in progress to end, and starts
// no more. The daemon calls it once it has cancelled its operations,
// before it closes the store.
func (s *Server) WaitBuilds() {
	s.images.mu.Lock()
	s.images.closed = true
	s.images.mu.Unlock()
	s.images.wg.Wait()
}

// listImages answers GET /v1/images: the images in the store, by name.
func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	if s.images.images == nil {
		s.fail(w, r, fmt.Errorf("this daemon keeps no images: %w", errdefs.ErrNotImplemented))
		return
	}
	imgs, err := s.images.images.List()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if imgs == nil {
		imgs = []guest.Image{}
	}
	s.reply(w, imgs)
}

// buildImage answers POST /v1/images (an ImageBuildRequest): it returns
// the image, building it first unless it exists (or a rebuild is asked
// for). A refused request gets the API's JSON error; otherwise the answer
// is JSON lines (application/x-ndjson): the build's progress, at most
// every progressInterval, then the ImageBuildResult or the error that
// ended the build.
func (s *Server) buildImage(w http.ResponseWriter, r *http.Request) {
	var req ImageBuildRequest
	if err := decode(w, r, maxRequestBody, &req); err != nil {
		s.fail(w, r, err)
		return
	}
	if s.images.images == nil {
		s.fail(w, r, fmt.Errorf("this daemon builds no images: %w", errdefs.ErrNotImplemented))
		return
	}
	if req.Tree != "" && !filepath.IsAbs(req.Tree) {
		s.fail(w, r, fmt.Errorf("tree %q is not an absolute path: %w", req.Tree, errdefs.ErrInvalidArgument))
		return
	}
	if req.Name == "" {
		req.Name = guest.DefaultImage
	}
	if !req.Rebuild && !req.Refetch {
		if img, err := s.images.images.Get(req.Name); err == nil {
			s.streamBuild(w, r, nil, &ImageBuildResult{Image: img, Existed: true})
			return
		}
	}
	b, _, err := s.images.start(req.Name, guest.BuildOptions{
		Name: req.Name, Size: req.Size, Mirror: req.Mirror,
		Rebuild: req.Rebuild, Refetch: req.Refetch, Tree: req.Tree,
	})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.streamBuild(w, r, b, nil)
}

// streamBuild sends build b's progress and end, or res when there is no
// build, as the JSON lines of POST /v1/images. It returns when the build
// has ended or the client has gone; the build goes on without the client.
func (s *Server) streamBuild(w http.ResponseWriter, r *http.Request, b *imageBuild, res *ImageBuildResult) {
	fl, ok := w.(http.Flusher)
	if !ok {
		s.fail(w, r, errors.New("images: the connection cannot stream"))
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	send := func(l imageLine) bool {
		if enc.Encode(l) != nil || bw.Flush() != nil {
			return false
		}
		fl.Flush()
		return true
	}
	if b == nil {
		send(imageLine{Result: res})
		return
	}
	fl.Flush() // the headers: the build has begun
	// from is the first step not sent in its final state; last is what
	// was sent of it.
	from, last := 0, BuildProgress{}
	sendProgress := func() bool {
		steps := b.progress(from)
		for i := range steps {
			if steps[i] != last {
				if !send(imageLine{Progress: &steps[i]}) {
					return false
				}
				last = steps[i]
			}
		}
		if len(steps) > 0 {
			from += len(steps) - 1
		}
		return true
	}
	tick := time.NewTicker(progressInterval)
	defer tick.Stop()
	for {
		select {
		case <-b.done:
			if !sendProgress() {
				return
			}
			if b.err != nil {
				cat, _ := Category(b.err)
				send(imageLine{Error: b.err.Error(), Category: cat})
				return
			}
			send(imageLine{Result: &ImageBuildResult{Image: b.img}})
			return
		case <-tick.C:
			if !sendProgress() {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// Images returns the images in the daemon's store, by name.
func (c *Client) Images(ctx context.Context) ([]guest.Image, error) {
	var out []guest.Image
	return out, c.do(ctx, http.MethodGet, "/v1/images", nil, &out)
}

// BuildImage returns the image req names, which the daemon builds first
// unless it exists (or req asks for a rebuild), calling progress (when not
// nil) with the build's progress as guest.BuildOptions.Progress is called.
// If ctx ends first, the build goes on in the daemon.
func (c *Client) BuildImage(ctx context.Context, req ImageBuildRequest, progress func(stage string, done, total int64)) (ImageBuildResult, error) {
	resp, err := c.open(ctx, http.MethodPost, "/v1/images", req)
	if err != nil {
		return ImageBuildResult{}, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for {
		var l imageLine
		if err := dec.Decode(&l); err != nil {
			if ctx.Err() != nil {
				return ImageBuildResult{}, ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return ImageBuildResult{}, fmt.Errorf("boxd daemon at %s: the build's answer ended before its result (%w): %w", c.socket, err, errdefs.ErrUnavailable)
		}
		switch {
		case l.Error != "":
			return ImageBuildResult{}, remoteError(http.StatusOK, errorBody{Error: l.Error, Category: l.Category})
		case l.Result != nil:
			return *l.Result, nil
		case l.Progress != nil && progress != nil:
			progress(l.Progress.Stage, l.Progress.Done, l.Progress.Total)
		}
	}
}
