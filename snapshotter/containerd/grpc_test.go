package containerd_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cli"
	"github.com/boxd-dev/boxd/snapshotter"
	ctdsnap "github.com/boxd-dev/boxd/snapshotter/containerd"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func dial(t testing.TB, sock string) (snapshots.Snapshotter, *grpc.ClientConn) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "boxd"), conn
}

// TestContainerdSuiteOverGRPC runs containerd's suite through the snapshots
// API, as containerd uses a proxy snapshotter.
func TestContainerdSuiteOverGRPC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the images are mounted with loop devices")
	}
	testsuite.SnapshotterSuite(t, "boxd-grpc", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		g, err := snapshotter.Open(filepath.Join(root, "store"))
		if err != nil {
			return nil, nil, err
		}
		sn, err := ctdsnap.NewSnapshotter(filepath.Join(root, "containerd"), g)
		if err != nil {
			g.Close()
			return nil, nil, err
		}
		sock := filepath.Join(root, "api.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			return nil, nil, err
		}
		srv := grpc.NewServer()
		snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
		go func() { _ = srv.Serve(l) }()
		client, conn := dial(t, sock)
		return client, func() error {
			conn.Close()
			srv.GracefulStop()
			return errors.Join(sn.Close(), g.Close())
		}, nil
	})
}

// TestSnapshotterCommand runs `boxd snapshotter` and talks to it.
func TestSnapshotterCommand(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the images are mounted with loop devices")
	}
	root := t.TempDir()
	sock := filepath.Join(t.TempDir(), "run", "snap.sock")
	// A stale socket nobody serves on is replaced.
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		t.Fatal(err)
	}
	stale, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout strings.Builder
	done := make(chan error, 1)
	go func() {
		app := cli.NewApp(&stdout, io.Discard)
		done <- app.RunContext(ctx, []string{"boxd", "snapshotter", "--root", root, "--address", sock, "--default-size", "67108864"})
	}()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("the command ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the command does not listen")
		}
		time.Sleep(20 * time.Millisecond)
	}

	sn, conn := dial(t, sock)
	defer conn.Close()
	ms, err := sn.Prepare(ctx, "a", "")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Type != "ext4" || !strings.HasPrefix(ms[0].Source, filepath.Join(root, "containerd", "images")+"/") {
		t.Fatalf("mounts %+v", ms)
	}
	if st, err := os.Stat(ms[0].Source); err != nil || st.Size() != 64<<20 {
		t.Fatalf("image: %v", err)
	}
	dir := t.TempDir()
	if err := mount.All(ms, dir); err != nil {
		t.Fatal(err)
	}
	werr := os.WriteFile(filepath.Join(dir, "hello"), []byte("hello\n"), 0o644)
	if err := mount.UnmountAll(dir, 0); err != nil || werr != nil {
		t.Fatal(err, werr)
	}
	if err := sn.Commit(ctx, "c", "a", snapshots.WithLabels(map[string]string{"x": "y"})); err != nil {
		t.Fatal(err)
	}
	if _, err := sn.View(ctx, "v", "c"); err != nil {
		t.Fatal(err)
	}
	if err := sn.Remove(ctx, "c"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("remove with children over gRPC: %v", err)
	}
	if _, err := sn.Prepare(ctx, "b", "missing"); !errdefs.IsNotFound(err) {
		t.Errorf("a missing parent over gRPC: %v", err)
	}
	if err := sn.Commit(ctx, "x", "v"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("commit of a view over gRPC: %v", err)
	}
	if err := sn.Remove(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if err := sn.(snapshots.Cleaner).Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	u, err := sn.Usage(ctx, "c")
	if err != nil || u.Size < 4096 {
		t.Errorf("usage %+v, %v", u, err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the command: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the command did not stop")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket is left: %v", err)
	}
	if !strings.Contains(stdout.String(), sock) {
		t.Errorf("stdout: %q", stdout.String())
	}

	// The committed snapshot is in boxd's graph.
	g, err := snapshotter.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	all, err := g.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || !strings.HasPrefix(all[0].Name, ctdsnap.DefaultPrefix) || all[0].Labels[ctdsnap.LabelName] != "c" {
		t.Errorf("graph: %+v", all)
	}
}
