package daemon

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/remote"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// fakeReceiver records the boxes a remote manager receives into its fake
// box manager.
type fakeReceiver struct{ m *fakeManager }

func (r fakeReceiver) Flush(context.Context) error { return nil }

func (r fakeReceiver) Receive(_ context.Context, bx box.Box) (box.Box, error) {
	bx.State = box.StateHibernated
	r.m.mu.Lock()
	defer r.m.mu.Unlock()
	r.m.boxes[bx.Name] = bx
	return bx, nil
}

// resumeFails is a box manager whose resumes fail with err.
type resumeFails struct {
	*fakeManager
	err error
}

func (m resumeFails) Resume(context.Context, string) (box.Box, error) { return box.Box{}, m.err }

// remoteHost is one root's remote manager on a fake box manager.
type remoteHost struct {
	g   *snapshotter.Graph
	m   *fakeManager
	rm  *remoteManager
	url string
}

func newRemoteHost(ctx context.Context, t *testing.T, url string, boxes ...box.Box) *remoteHost {
	t.Helper()
	root := t.TempDir()
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	b, err := remote.OpenS3(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	r, err := remote.Open(remote.Config{Bucket: b, Graph: g, Root: root})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	m := newFakeManager(boxes...)
	return &remoteHost{g: g, m: m, rm: newRemoteManager(m, fakeReceiver{m}, r, slog.New(slog.DiscardHandler)), url: url}
}

func (h *remoteHost) ingest(ctx context.Context, t *testing.T, name, parent string, seed uint64) {
	t.Helper()
	data := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	if _, err := h.g.Ingest(ctx, bytes.NewReader(data), snapshotter.IngestOptions{Name: name, Parent: parent}); err != nil {
		t.Fatal(err)
	}
}

func (h *remoteHost) leaseHolder(ctx context.Context, t *testing.T) string {
	t.Helper()
	l, err := h.rm.r.LeaseOf(ctx, "dev")
	if errors.Is(err, errdefs.ErrNotFound) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return l.Host
}

// TestRemoteManager walks a box between two hosts on a real S3 server:
// the lease, the push retried after the store was down, and a failed
// resume that keeps a lease held for a push to retry.
func TestRemoteManager(t *testing.T) {
	if testing.Short() {
		t.Skip("starts versitygw; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s3 := testutil.StartS3(ctx, t, t.TempDir(), "boxd")
	s3.SetEnv(t)
	const url = "s3://boxd/hosts"

	a := newRemoteHost(ctx, t, url, box.Box{Name: "dev", State: box.StateRunning, Snapshot: "s1"})
	a.ingest(ctx, t, "s1", "", 1)
	b := newRemoteHost(ctx, t, url)

	// A hibernates dev: pushed, its lease given up.
	if _, err := a.rm.Hibernate(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if p, _ := a.rm.r.Pending(); len(p) != 0 || a.leaseHolder(ctx, t) != "" {
		t.Fatalf("after A's hibernate: pending %v, lease %q; want neither", p, a.leaseHolder(ctx, t))
	}
	// B resumes it: pulled, received, leased to B.
	if _, err := b.rm.Resume(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if bx, err := b.m.lookup("dev"); err != nil || bx.State != box.StateRunning || bx.Snapshot != "s1" {
		t.Fatalf("dev on B: %+v %v", bx, err)
	}
	if _, err := b.g.Get("s1"); err != nil {
		t.Fatalf("s1 on B: %v", err)
	}
	if got := a.leaseHolder(ctx, t); got != b.rm.r.Host() {
		t.Fatalf("lease after B's resume: %q, want B", got)
	}
	// A's resume of its older record is refused and changes nothing.
	if _, err := a.rm.Resume(ctx, "dev"); !errors.Is(err, remote.ErrLeased) {
		t.Fatalf("A's resume while B owns dev: %v, want ErrLeased", err)
	}
	if got := a.leaseHolder(ctx, t); got != b.rm.r.Host() {
		t.Fatalf("lease after A's refused resume: %q, want B", got)
	}

	// B hibernates a newer state with the store down: it stays
	// hibernated, pending, and B keeps the lease.
	b.ingest(ctx, t, "s2", "s1", 2)
	b.m.mu.Lock()
	bx := b.m.boxes["dev"]
	bx.Snapshot = "s2"
	b.m.boxes["dev"] = bx
	b.m.mu.Unlock()
	s3.Stop()
	short, stop := context.WithTimeout(ctx, 20*time.Second)
	if _, err := b.rm.Hibernate(short, "dev"); err != nil {
		t.Fatalf("hibernate with the store down: %v", err)
	}
	stop()
	s3.Restart(t)
	if p, _ := b.rm.r.Pending(); !slices.Equal(p, []string{"dev"}) || b.leaseHolder(ctx, t) != b.rm.r.Host() {
		t.Fatalf("after a push that failed: pending %v, lease %q; want dev pending, B holding", p, b.leaseHolder(ctx, t))
	}
	// A resume on B that fails keeps the lease (B's push still waits),
	// and pulls nothing over B's newer state.
	failing := newRemoteManager(resumeFails{b.m, errors.New("no machine")}, fakeReceiver{b.m}, b.rm.r, slog.New(slog.DiscardHandler))
	if _, err := failing.Resume(ctx, "dev"); err == nil {
		t.Fatal("a failing resume succeeded")
	}
	if got, _ := b.m.lookup("dev"); got.Snapshot != "s2" || b.leaseHolder(ctx, t) != b.rm.r.Host() {
		t.Fatalf("after a failed resume on B: dev at %q, lease %q; want s2 and B holding", got.Snapshot, b.leaseHolder(ctx, t))
	}
	// The retry pushes it; A then pulls the newer state.
	if err := b.rm.PushBox(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if p, _ := b.rm.r.Pending(); len(p) != 0 || b.leaseHolder(ctx, t) != "" {
		t.Fatalf("after the retried push: pending %v, lease %q", p, b.leaseHolder(ctx, t))
	}
	a.m.mu.Lock()
	bx = a.m.boxes["dev"]
	bx.State = box.StateHibernated
	a.m.boxes["dev"] = bx
	a.m.mu.Unlock()
	if _, err := a.rm.Resume(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if got, _ := a.m.lookup("dev"); got.Snapshot != "s2" || got.State != box.StateRunning {
		t.Fatalf("dev on A after B's push: %+v, want s2 running", got)
	}

	// A is gone: its lease is broken from B, naming A; naming another
	// host is refused.
	if err := b.rm.r.BreakLease(ctx, "dev", "elsewhere"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("breaking a lease naming the wrong host: %v, want failed precondition", err)
	}
	if err := b.rm.r.BreakLease(ctx, "dev", a.rm.r.Host()); err != nil || b.leaseHolder(ctx, t) != "" {
		t.Fatalf("breaking A's lease: %v, lease %q", err, b.leaseHolder(ctx, t))
	}
}
