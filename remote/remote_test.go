package remote_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/remote"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// host is one root linked to the bucket.
type host struct {
	root string
	g    *snapshotter.Graph
	r    *remote.Remote
}

func newHost(ctx context.Context, t testing.TB, url string) *host {
	t.Helper()
	root := t.TempDir()
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	b, err := remote.OpenS3(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	r, err := remote.Open(remote.Config{Bucket: b, Graph: g, Root: root, DropLabels: []string{"drop"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return &host{root: root, g: g, r: r}
}

func mustS3(ctx context.Context, t testing.TB, url string) *remote.S3 {
	t.Helper()
	b, err := remote.OpenS3(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// data returns n bytes, a quarter of its chunks zero.
func data(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := 0; i < n; i += 4096 {
		if rng.IntN(4) != 0 {
			for j := i; j < i+4096 && j < n; j += 8 {
				v := rng.Uint64()
				for k := 0; k < 8 && j+k < n; k++ {
					b[j+k] = byte(v >> (8 * k))
				}
			}
		}
	}
	return b
}

func export(t testing.TB, g *snapshotter.Graph, snap string) []byte {
	t.Helper()
	mr, err := g.OpenMap(snap, "disk")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, mr.Size())
	if _, err := mr.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return buf
}

func startS3(ctx context.Context, t testing.TB) (*testutil.S3Server, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts versitygw; skipped with -short")
	}
	s := testutil.StartS3(ctx, t, t.TempDir(), "boxd")
	s.SetEnv(t)
	return s, "s3://boxd/test"
}

func TestPushPull(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, url := startS3(ctx, t)
	a, b := newHost(ctx, t, url), newHost(ctx, t, url)

	base := data(1, 8<<20)
	if _, err := a.g.Ingest(ctx, bytes.NewReader(base), snapshotter.IngestOptions{Name: "base", Labels: map[string]string{"path": a.root + "/disks/x", "drop": "gone"}}); err != nil {
		t.Fatal(err)
	}
	top := append([]byte(nil), base...)
	copy(top[1<<20:], data(2, 1<<20))
	if _, err := a.g.Ingest(ctx, bytes.NewReader(top), snapshotter.IngestOptions{Name: "top", Parent: "base"}); err != nil {
		t.Fatal(err)
	}
	pst, err := a.r.Push(ctx, "top")
	if err != nil {
		t.Fatal(err)
	}
	if pst.Snapshots != 2 || pst.Packs == 0 {
		t.Fatalf("push: %+v, want 2 manifests and packs", pst)
	}
	if again, err := a.r.Push(ctx, "top"); err != nil || again.Snapshots != 0 || again.Packs != 0 {
		t.Fatalf("second push: %+v %v, want nothing sent", again, err)
	}
	st, err := b.r.Pull(ctx, "top")
	if err != nil {
		t.Fatal(err)
	}
	if st.Snapshots != 2 || st.Chunks == 0 || st.Requests == 0 {
		t.Fatalf("pull: %+v", st)
	}
	if got := export(t, b.g, "top"); !bytes.Equal(got, top) {
		t.Fatal("pulled snapshot differs")
	}
	s, err := b.g.Get("base")
	if err != nil {
		t.Fatal(err)
	}
	if s.Labels["path"] != b.root+"/disks/x" || s.Labels["drop"] != "" {
		t.Fatalf("labels on the second host: %v", s.Labels)
	}
	// A child made on B pushes what B made alone.
	child := append([]byte(nil), top...)
	copy(child, data(3, 64<<10))
	if _, err := b.g.Ingest(ctx, bytes.NewReader(child), snapshotter.IngestOptions{Name: "child", Parent: "top"}); err != nil {
		t.Fatal(err)
	}
	cst, err := b.r.Push(ctx, "child")
	if err != nil {
		t.Fatal(err)
	}
	if cst.Snapshots != 1 || cst.ChunksFound != 0 {
		t.Logf("child push: %+v", cst)
	}
	if _, err := a.r.Pull(ctx, "child"); err != nil {
		t.Fatal(err)
	}
	if got := export(t, a.g, "child"); !bytes.Equal(got, child) {
		t.Fatal("child pulled back differs")
	}
}

func TestPullRefusesDamage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, url := startS3(ctx, t)
	a, b := newHost(ctx, t, url), newHost(ctx, t, url)
	disk := data(4, 2<<20)
	if _, err := a.g.Ingest(ctx, bytes.NewReader(disk), snapshotter.IngestOptions{Name: "s"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.r.Push(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	packs, _ := filepath.Glob(filepath.Join(s.Data, "boxd", "test", "packs", "*.pack"))
	if len(packs) == 0 {
		t.Fatal("no pack in the bucket's folder")
	}
	for _, p := range packs {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("damage!!"), 4096); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	_, err := b.r.Pull(ctx, "s")
	if !errors.Is(err, errdefs.ErrDataLoss) {
		t.Fatalf("pull of a damaged pack: %v, want data loss", err)
	}
	if _, err := b.g.Get("s"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("the snapshot was added despite the damage: %v", err)
	}
}

func TestPushResumes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, url := startS3(ctx, t)
	a := newHost(ctx, t, url)
	disk := data(5, 4<<20)
	if _, err := a.g.Ingest(ctx, bytes.NewReader(disk), snapshotter.IngestOptions{Name: "s"}); err != nil {
		t.Fatal(err)
	}
	// The store goes away: the push fails, saying so, and leaves no
	// manifest behind.
	s.Stop()
	short, stop := context.WithTimeout(ctx, 20*time.Second)
	_, err := a.r.Push(short, "s")
	stop()
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("push to a stopped store: %v, want unavailable", err)
	}
	s.Restart(t)
	if _, err := a.r.Push(ctx, "s"); err != nil {
		t.Fatalf("push once the store is back: %v", err)
	}

	// A push cut off after any number of writes leaves a bucket that a
	// reader finds whole or not at all, and the next push completes it.
	for cut := 0; ; cut++ {
		url := fmt.Sprintf("s3://boxd/cut-%d", cut)
		w := newHost(ctx, t, url)
		if _, err := w.g.Ingest(ctx, bytes.NewReader(disk), snapshotter.IngestOptions{Name: "s"}); err != nil {
			t.Fatal(err)
		}
		cb := &cutBucket{Bucket: mustS3(ctx, t, url), left: cut}
		cr, err := remote.Open(remote.Config{Bucket: cb, Graph: w.g, Root: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		_, perr := cr.Push(ctx, "s")
		cr.Close()
		r := newHost(ctx, t, url)
		_, err = r.r.Pull(ctx, "s")
		switch {
		case perr == nil && err == nil:
		case perr != nil && errors.Is(err, errdefs.ErrNotFound):
		default:
			t.Fatalf("cut after %d writes: push %v, pull %v", cut, perr, err)
		}
		if _, err := w.r.Push(ctx, "s"); err != nil {
			t.Fatalf("cut after %d writes: the next push: %v", cut, err)
		}
		if _, err := r.r.Pull(ctx, "s"); err != nil {
			t.Fatalf("cut after %d writes: pull after the next push: %v", cut, err)
		}
		if got := export(t, r.g, "s"); !bytes.Equal(got, disk) {
			t.Fatalf("cut after %d writes: pulled snapshot differs", cut)
		}
		if perr == nil {
			break // the cut came after the last write
		}
	}
}

// cutBucket fails every write after the first left, as a push killed
// there would leave the bucket.
type cutBucket struct {
	remote.Bucket
	mu   sync.Mutex
	left int
}

func (c *cutBucket) Put(ctx context.Context, key string, r io.ReadSeeker, size int64, create bool) error {
	c.mu.Lock()
	c.left--
	cut := c.left < 0
	c.mu.Unlock()
	if cut {
		return fmt.Errorf("cut off before %s: %w", key, errdefs.ErrUnavailable)
	}
	return c.Bucket.Put(ctx, key, r, size, create)
}

func TestLease(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	_, url := startS3(ctx, t)
	hosts := []*host{newHost(ctx, t, url), newHost(ctx, t, url), newHost(ctx, t, url)}
	for round := range 3 {
		errs := make([]error, len(hosts))
		var wg sync.WaitGroup
		for i, h := range hosts {
			wg.Go(func() { _, errs[i] = h.r.TakeLease(ctx, "dev") })
		}
		wg.Wait()
		winner := -1
		for i, err := range errs {
			switch {
			case err == nil && winner >= 0:
				t.Fatalf("round %d: hosts %d and %d both took the lease", round, winner, i)
			case err == nil:
				winner = i
			case !errors.Is(err, remote.ErrLeased) || !strings.Contains(err.Error(), "owned by host"):
				t.Fatalf("round %d: host %d: %v, want ErrLeased", round, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: nobody took the lease: %v", round, errs)
		}
		if taken, err := hosts[winner].r.TakeLease(ctx, "dev"); err != nil || taken {
			t.Fatalf("the owner taking its lease again: %v %v, want it held already", taken, err)
		}
		for _, h := range hosts {
			if err := h.r.ReleaseLease(ctx, "dev"); err != nil {
				t.Fatal(err)
			}
		}
	}
}
