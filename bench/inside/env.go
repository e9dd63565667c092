package main

import (
	"context"
	"fmt"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
)

// bench is one run: the kept root, its daemon, and what the clean-up found.
type bench struct {
	boxd   benchkit.Boxd // the boxd binary on DIR/root
	dir    string        // the kept folder
	daemon *benchkit.Daemon

	tornDown bool
	cleanup  benchkit.Cleanup
}

// The measured box, and the name of its forks from the host; its forks
// from inside are named by boxd (dev-1).
const (
	box = "dev"
	kid = "kid"
)

// setUp makes or finds the image, clears what an earlier run left, starts
// the daemon and creates the box. The bench it returns (also on failure,
// once there is one) must be torn down.
func setUp(ctx context.Context) (*bench, error) {
	bx, d, err := benchkit.OpenRoot(*dir, *boxdBin, "bench/inside.sh", "pgrep", "qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	b := &bench{boxd: bx, dir: d}
	benchkit.Progress("root %s (kept: store, image, kernel), daemon log %s", b.boxd.Root, b.daemonLog())

	took, err := b.boxd.EnsureImage(ctx, guest.DefaultImage, *treeCache)
	if err != nil {
		return b, err
	}
	if took > 0 {
		benchkit.Progress("image built in %s", secs(took))
	}

	// A run cut short leaves boxes, and the snapshots boxd keeps of them,
	// which only a stopped daemon's store can drop.
	left, err := b.boxd.BoxSnapshots(ctx)
	if err != nil {
		return b, err
	}
	if err := b.startDaemon(ctx); err != nil {
		return b, err
	}
	n, err := b.boxd.RemoveBoxes(ctx)
	if err != nil {
		return b, fmt.Errorf("removing an earlier run's boxes: %w", err)
	}
	if n > 0 || len(left) > 0 {
		benchkit.Progress("an earlier run left %d boxes and %d box snapshots: removed", n, len(left))
		err := b.daemon.Stop()
		b.daemon = nil
		if err != nil {
			return b, err
		}
		if _, err := b.boxd.ClearStore(ctx); err != nil {
			return b, err
		}
		if err := b.startDaemon(ctx); err != nil {
			return b, err
		}
	}
	if took, _, err = b.boxd.CLI(ctx, "create", box, "--memory", *memory, "--runner", "qemu"); err != nil {
		return b, err
	}
	benchkit.Progress("created box %s (%s, qemu runner) in %s", box, *memory, secs(took))
	return b, nil
}

func (b *bench) daemonLog() string { return benchkit.DaemonLog(b.dir) }

// startDaemon starts the root's daemon with its SSH front door on a free
// port of 127.0.0.1 and no idle hibernation.
func (b *bench) startDaemon(ctx context.Context) error {
	d, err := b.boxd.StartDaemon(ctx, b.daemonLog(), "--ssh-listen", "127.0.0.1:0", "--idle-hibernate", "0")
	if err != nil {
		return err
	}
	b.daemon = d
	benchkit.Progress("boxd daemon up (pid %d)", d.Pid())
	return nil
}

// tearDown removes the boxes, stops the daemon, checks that no QEMU of the
// root is left (killing any), and drops what boxd kept of the boxes
// (benchkit.Boxd.Clean). A second call does nothing.
func (b *bench) tearDown() error {
	if b == nil || b.tornDown {
		return nil
	}
	b.tornDown = true
	c, err := b.boxd.Clean(b.daemon)
	b.daemon, b.cleanup = nil, c
	return err
}

// showDaemonLog prints the end of the daemon's log on stderr.
func (b *bench) showDaemonLog() {
	if b != nil {
		benchkit.ShowTail(b.daemonLog(), 20)
	}
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
