package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
	ctdsnap "github.com/boxd-dev/boxd/snapshotter/containerd"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
)

// snapshotterStopTimeout is how long the snapshotter's calls in flight
// may finish when the daemon stops.
const snapshotterStopTimeout = 10 * time.Second

// containerdSnapshotter is containerd's snapshots API the daemon serves on
// its own store (Config.ContainerdSnapshotter).
type containerdSnapshotter struct {
	sn     *ctdsnap.Snapshotter
	srv    *grpc.Server
	socket string
	served chan struct{}
}

// serveSnapshotter serves containerd's snapshots API on g at socket, with
// its records and images in ROOT/containerd, where boxd snapshotter keeps
// them.
func serveSnapshotter(socket, root string, g *snapshotter.Graph, log *slog.Logger) (*containerdSnapshotter, error) {
	s, err := ctdsnap.NewSnapshotter(filepath.Join(root, "containerd"), g)
	if err != nil {
		return nil, fmt.Errorf("containerd snapshotter: %w", err)
	}
	l, err := listenSocket(socket)
	if err != nil {
		_ = s.Close()
		return nil, fmt.Errorf("containerd snapshotter: %w", err)
	}
	cs := &containerdSnapshotter{sn: s.(*ctdsnap.Snapshotter), srv: ctdsnap.NewServer(s), socket: socket, served: make(chan struct{})}
	go func() {
		defer close(cs.served)
		if err := cs.srv.Serve(l); err != nil {
			log.Error("containerd snapshotter: serving stopped", "socket", socket, "err", err)
		}
	}()
	log.Info("serving containerd's snapshots API", "socket", socket)
	return cs, nil
}

// stop lets the calls in flight finish for a while, then ends them, and
// closes the snapshotter.
func (cs *containerdSnapshotter) stop() {
	stopped := make(chan struct{})
	go func() {
		cs.srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(snapshotterStopTimeout):
		cs.srv.Stop()
		<-stopped
	}
	<-cs.served
	_ = cs.sn.Close()
	_ = os.Remove(cs.socket)
}

var _ Rootfs = (*containerdSnapshotter)(nil)

// Base is the snapshot of the store the root file system at source (a
// mount's Source) starts from: its committed parent. containerd writes
// nothing into a container's root file system before the task starts, so
// the box's disk begins as that parent; the image is never mounted on the
// host.
func (cs *containerdSnapshotter) Base(ctx context.Context, source string) (string, error) {
	src, err := cs.sn.SnapshotForSource(ctx, source)
	if err != nil {
		return "", err
	}
	if src.Base == "" {
		return "", fmt.Errorf("%s (snapshot %s) stands on no committed layer: a box boots only an image with a root file system: %w", source, src.Key, errdefs.ErrInvalidArgument)
	}
	return src.Base, nil
}

// Extract writes the files of the root file system at source into dir.
func (cs *containerdSnapshotter) Extract(ctx context.Context, source, dir string) error {
	return cs.sn.ExtractSource(ctx, source, dir)
}
