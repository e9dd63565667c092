package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/guest"
	"github.com/containerd/errdefs"
)

// fakeImages builds images in memory. A build reports its stages, then
// waits for gate (or its context) before it stores the image.
type fakeImages struct {
	mu     sync.Mutex
	gate   chan struct{}
	images map[string]guest.Image
	builds []guest.BuildOptions
	// began is told each build's name once it has reported its stages.
	began chan string
}

func newFakeImages() *fakeImages {
	return &fakeImages{gate: make(chan struct{}), images: map[string]guest.Image{}, began: make(chan string, 16)}
}

func (f *fakeImages) List() ([]guest.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []guest.Image
	for _, img := range f.images {
		out = append(out, img)
	}
	return out, nil
}

func (f *fakeImages) Get(name string) (guest.Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img, ok := f.images[name]
	if !ok {
		return guest.Image{}, fmt.Errorf("no image %q: %w", name, errdefs.ErrNotFound)
	}
	return img, nil
}

func (f *fakeImages) Build(ctx context.Context, opts guest.BuildOptions) (guest.Image, error) {
	f.mu.Lock()
	f.builds = append(f.builds, opts)
	f.mu.Unlock()
	if opts.Name == "debian-bad" {
		return guest.Image{}, fmt.Errorf("image %q: no such suite: %w", opts.Name, errdefs.ErrInvalidArgument)
	}
	opts.Progress(guest.StageConfigure, 0, 1)
	opts.Progress(guest.StageConfigure, 1, 1)
	opts.Progress(guest.StageStore, 0, 100)
	opts.Progress(guest.StageStore, 40, 100)
	f.began <- opts.Name
	f.mu.Lock()
	gate := f.gate
	f.mu.Unlock()
	select {
	case <-gate:
	case <-ctx.Done():
		return guest.Image{}, ctx.Err()
	}
	opts.Progress(guest.StageStore, 100, 100)
	img := guest.Image{Name: opts.Name, Snapshot: guest.SnapshotName(opts.Name), Size: opts.Size, Built: time.Now(), Source: "tree " + opts.Tree}
	f.mu.Lock()
	f.images[opts.Name] = img
	f.mu.Unlock()
	return img, nil
}

// open lets the builds waiting store their images; later builds wait
// again for the next open.
func (f *fakeImages) open() {
	f.mu.Lock()
	defer f.mu.Unlock()
	close(f.gate)
	f.gate = make(chan struct{})
}

func (f *fakeImages) buildCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.builds)
}

// progressLog collects what a client was told of a build.
type progressLog struct {
	mu    sync.Mutex
	steps []BuildProgress
}

func (p *progressLog) add(stage string, done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.steps = append(p.steps, BuildProgress{stage, done, total})
}

func (p *progressLog) String() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for _, s := range p.steps {
		fmt.Fprintf(&b, "%s %d/%d; ", s.Stage, s.Done, s.Total)
	}
	return b.String()
}

type buildAnswer struct {
	res ImageBuildResult
	err error
}

// The image routes: a build streams its progress and ends with the image;
// a second request for an image being built joins the build, a rebuild of
// it is refused; a client that goes away leaves the build to finish; an
// image that exists is answered without a build; failures keep their
// category.
func TestImageBuilds(t *testing.T) {
	imgs := newFakeImages()
	srv := NewServer(context.Background(), Options{Manager: newFakeManager(), Graph: &fakeGraph{}, Images: imgs})
	c := serve(t, srv)
	ctx := context.Background()

	got, err := c.Images(ctx)
	if err != nil || got == nil || len(got) != 0 {
		t.Fatalf("images of an empty store: %v, %v; want []", got, err)
	}

	build := func(ctx context.Context, req ImageBuildRequest, p *progressLog) chan buildAnswer {
		ch := make(chan buildAnswer, 1)
		go func() {
			var fn func(string, int64, int64)
			if p != nil {
				fn = p.add
			}
			res, err := c.BuildImage(ctx, req, fn)
			ch <- buildAnswer{res, err}
		}()
		return ch
	}
	wait := func(ch chan buildAnswer) buildAnswer {
		t.Helper()
		select {
		case a := <-ch:
			return a
		case <-time.After(10 * time.Second):
			t.Fatal("no answer to the build")
		}
		return buildAnswer{}
	}
	began := func(want string) {
		t.Helper()
		select {
		case name := <-imgs.began:
			if name != want {
				t.Fatalf("build of %s began, want %s", name, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("the build of %s did not begin", want)
		}
	}

	var first, joined progressLog
	a := build(ctx, ImageBuildRequest{Name: "debian-x", Size: 64 << 20, Tree: "/srv/tree"}, &first)
	began("debian-x")
	b := build(ctx, ImageBuildRequest{Name: "debian-x", Tree: "/elsewhere"}, &joined)
	gone, leave := context.WithCancel(ctx)
	g := build(gone, ImageBuildRequest{Name: "debian-x"}, nil)
	_, err = c.BuildImage(ctx, ImageBuildRequest{Name: "debian-x", Rebuild: true}, nil)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "image debian-x is being built") {
		t.Fatalf("a rebuild during the build: %v, want a failed precondition saying it is being built", err)
	}
	leave()
	if ga := wait(g); !errors.Is(ga.err, context.Canceled) {
		t.Fatalf("a client that went away: %v, want context.Canceled", ga.err)
	}
	// The joined request has been told the progress so far: the build is
	// one and holds both.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(joined.String(), "store 40/100") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	imgs.open()
	ra, rb := wait(a), wait(b)
	if ra.err != nil || rb.err != nil {
		t.Fatalf("builds: %v, %v", ra.err, rb.err)
	}
	if ra.res.Existed || ra.res.Image.Name != "debian-x" || ra.res.Image.Size != 64<<20 || ra.res.Image.Source != "tree /srv/tree" {
		t.Errorf("first build: %+v", ra.res)
	}
	if rb.res != ra.res {
		t.Errorf("the joined build answered %+v, the first %+v", rb.res, ra.res)
	}
	if n := imgs.buildCount(); n != 1 {
		t.Errorf("%d builds, want 1", n)
	}
	for _, p := range []*progressLog{&first, &joined} {
		s := p.String()
		if !strings.HasPrefix(s, "configure ") || !strings.HasSuffix(s, "store 100/100; ") || !strings.Contains(s, "store 40/100") {
			t.Errorf("progress told: %q; want configure first, store 40/100, and store 100/100 last", s)
		}
	}

	// Built: the image is answered, nothing is built.
	r := wait(build(ctx, ImageBuildRequest{Name: "debian-x"}, nil))
	if r.err != nil || !r.res.Existed || r.res.Image != ra.res.Image || imgs.buildCount() != 1 {
		t.Errorf("build of a built image: %+v, %v (%d builds)", r.res, r.err, imgs.buildCount())
	}
	if got, err := c.Images(ctx); err != nil || len(got) != 1 || got[0] != ra.res.Image {
		t.Errorf("images: %+v, %v", got, err)
	}

	// A build whose only client goes away goes on to the end.
	leaving, leave := context.WithCancel(ctx)
	l := build(leaving, ImageBuildRequest{Name: "debian-z"}, nil)
	began("debian-z")
	leave()
	if la := wait(l); !errors.Is(la.err, context.Canceled) {
		t.Fatalf("a client that went away: %v, want context.Canceled", la.err)
	}
	imgs.open()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := imgs.Get("debian-z"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the build of debian-z ended with its client")
		}
	}

	// A failed build's error keeps its category; a relative tree is
	// refused before anything is built.
	if _, err := c.BuildImage(ctx, ImageBuildRequest{Name: "debian-bad"}, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "no such suite") {
		t.Errorf("failed build: %v", err)
	}
	if _, err := c.BuildImage(ctx, ImageBuildRequest{Name: "debian-y", Tree: "tree"}, nil); !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "not an absolute path") {
		t.Errorf("relative tree: %v", err)
	}

	// A server without images refuses the routes.
	bare := serve(t, newTestServer(newFakeManager(), &fakeGraph{}))
	if _, err := bare.Images(ctx); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("images of a server without: %v", err)
	}
	if _, err := bare.BuildImage(ctx, ImageBuildRequest{}, nil); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("build on a server without images: %v", err)
	}
}

// A build in progress when the daemon stops is cancelled, its client is
// told so, and WaitBuilds returns once it has ended.
func TestImageBuildDaemonStops(t *testing.T) {
	imgs := newFakeImages()
	daemonCtx, stop := context.WithCancel(context.Background())
	srv := NewServer(daemonCtx, Options{Manager: newFakeManager(), Graph: &fakeGraph{}, Images: imgs})
	c := serve(t, srv)
	done := make(chan error, 1)
	go func() {
		_, err := c.BuildImage(context.Background(), ImageBuildRequest{}, nil)
		done <- err
	}()
	if name := <-imgs.began; name != guest.DefaultImage {
		t.Fatalf("built %q, want the default image", name)
	}
	stop()
	srv.WaitBuilds()
	select {
	case err := <-done:
		if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "the daemon stopped while building image "+guest.DefaultImage) {
			t.Fatalf("build when the daemon stops: %v, want unavailable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no answer")
	}
	if _, err := c.BuildImage(context.Background(), ImageBuildRequest{Name: "debian-x"}, nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("build after the daemon stopped: %v, want unavailable", err)
	}
}
