package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
	ctdsnap "github.com/boxd-dev/boxd/snapshotter/containerd"
	"github.com/containerd/errdefs"
	"github.com/urfave/cli/v2"
)

// snapshotterStopTimeout is how long a stop waits for calls in flight
// before it cuts them off.
const snapshotterStopTimeout = 30 * time.Second

func snapshotterCommand() *cli.Command {
	return &cli.Command{
		Name:  "snapshotter",
		Usage: "serve containerd's snapshots API (a proxy snapshotter) on the store, until SIGINT or SIGTERM",
		Description: "Committed snapshots are snapshots of the store named ctd-<id>; active snapshots and views are\n" +
			"ext4 images mounted with a loop device. containerd's records and the images live in ROOT/containerd.\n" +
			"In containerd's config:\n" +
			"  [proxy_plugins.boxd]\n" +
			"    type = \"snapshot\"\n" +
			"    address = \"SOCK\"",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Usage: "folder holding boxd's store and metadata (default: the global --root)"},
			&cli.StringFlag{Name: "address", Usage: "unix socket to serve the API on", Required: true},
			&cli.Int64Flag{Name: "default-size", Value: ctdsnap.DefaultSize, Usage: "size in bytes of a new image without a parent, unless the label containerd.io/snapshot/max-size says"},
		},
		Action: runSnapshotter,
	}
}

func runSnapshotter(c *cli.Context) error {
	root := c.String("root")
	for _, p := range c.Lineage()[1:] {
		if root != "" {
			break
		}
		root = p.String("root")
	}
	if root == "" {
		return usageError("--root must not be empty")
	}
	addr := c.String("address")
	if addr == "" {
		return usageError("--address must not be empty")
	}
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	defer g.Close()
	sn, err := ctdsnap.NewSnapshotter(filepath.Join(root, "containerd"), g, ctdsnap.WithDefaultSize(c.Int64("default-size")))
	if err != nil {
		return err
	}
	defer sn.Close()
	l, err := listenUnix(addr)
	if err != nil {
		return err
	}
	defer os.Remove(addr)

	srv := ctdsnap.NewServer(sn)
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	fmt.Fprintf(c.App.Writer, "serving containerd's snapshots API on %s (root %s)\n", addr, root)

	select {
	case err := <-served:
		return fmt.Errorf("serving %s: %w", addr, err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(snapshotterStopTimeout):
		srv.Stop()
		<-stopped
	}
	return nil
}

// listenUnix listens on the unix socket addr, replacing a socket nobody
// serves on any more.
func listenUnix(addr string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(addr), 0o700); err != nil {
		return nil, fmt.Errorf("creating the socket's folder: %w", err)
	}
	if st, err := os.Lstat(addr); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, usageError("--address %s exists and is not a socket", addr)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, derr := (&net.Dialer{}).DialContext(ctx, "unix", addr)
		cancel()
		if derr == nil {
			conn.Close()
			return nil, fmt.Errorf("%s is in use by another server: %w", addr, errdefs.ErrUnavailable)
		}
		if err := os.Remove(addr); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", addr, err)
	}
	return l, nil
}
