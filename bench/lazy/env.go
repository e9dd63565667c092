package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
)

// bench is one run: the kept root, its daemon of the moment, the client's
// key, and what the clean-up found.
type bench struct {
	boxd benchkit.Boxd // the boxd binary on DIR/root
	dir  string        // the kept folder
	work string        // this run's folder under dir (the key); removed at the end
	key  string        // the client's private key; key+".pub" is authorized by the boxes
	port string        // the daemon's SSH front door, the same for every daemon

	daemon *benchkit.Daemon // nil between phases
	eager  bool             // the daemon's mode: --eager-restore

	tornDown bool
	cleanup  benchkit.Cleanup
}

// Names of the boxes the run makes.
const (
	dev    = "dev"    // -mem, its page cache filled: the resume, ssh and memory rows
	big    = "big"    // -big-mem, -touch-big MiB in a tmpfs
	little = "little" // -big-mem, -touch-small MiB in a tmpfs
)

// setUp makes or finds the image, clears what an earlier run left, and
// makes the three boxes, leaving them hibernated and no daemon running:
// every phase starts from there. The bench it returns (also on failure,
// once there is one) must be torn down.
func setUp(ctx context.Context) (*bench, error) {
	bx, d, err := benchkit.OpenRoot(*dir, *boxdBin, "bench/lazy.sh", "ssh", "ssh-keygen", "pgrep", "qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	b := &bench{boxd: bx, dir: d}
	if b.work, err = os.MkdirTemp(d, "run-"); err != nil {
		return nil, err
	}
	benchkit.Progress("root %s (kept: store, image, kernel), daemon log %s, this run's key in %s", b.boxd.Root, b.daemonLog(), b.work)

	took, err := b.boxd.EnsureImage(ctx, guest.DefaultImage, *treeCache)
	if err != nil {
		return b, err
	}
	if took > 0 {
		benchkit.Progress("image built in %s", secs(took))
	}
	b.key = filepath.Join(b.work, "id_ed25519")
	if _, _, err := benchkit.Timed(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "boxd-bench-lazy", "-f", b.key); err != nil {
		return b, err
	}
	if b.port, err = freePort(); err != nil {
		return b, err
	}

	// A run cut short leaves boxes, and the snapshots boxd keeps of them,
	// which only a stopped daemon's store can drop.
	left, err := b.boxd.BoxSnapshots(ctx)
	if err != nil {
		return b, err
	}
	if err := b.startDaemon(ctx, false); err != nil {
		return b, err
	}
	n, err := b.boxd.RemoveBoxes(ctx)
	if err != nil {
		return b, fmt.Errorf("removing an earlier run's boxes: %w", err)
	}
	if n > 0 || len(left) > 0 {
		benchkit.Progress("an earlier run left %d boxes and %d box snapshots: removed", n, len(left))
		if err := b.stopDaemon(); err != nil {
			return b, err
		}
		if _, err := b.boxd.ClearStore(ctx); err != nil {
			return b, err
		}
		if err := b.startDaemon(ctx, false); err != nil {
			return b, err
		}
	}
	if err := b.makeBoxes(ctx); err != nil {
		return b, err
	}
	return b, b.stopDaemon() // which hibernates the boxes
}

// makeBoxes creates the three boxes and has each use its memory: dev
// writes -fill MiB to a file on its disk and reads it back (page cache),
// big and little write -touch-big and -touch-small MiB of random data
// into a tmpfs (memory the guest cannot drop).
func (b *bench) makeBoxes(ctx context.Context) error {
	fill := fmt.Sprintf("head -c %dM /dev/urandom > /var/tmp/fill && cat /var/tmp/fill > /dev/null && sync", *fillMiB)
	touch := func(mib int) string {
		return fmt.Sprintf("mkdir -p /mnt/x && mount -t tmpfs -o size=%dm tmpfs /mnt/x && head -c %dM /dev/urandom > /mnt/x/p", mib+mib/8+16, mib)
	}
	for _, c := range []struct{ name, mem, use, what string }{
		{dev, *memory, fill, fmt.Sprintf("%d MiB written to /var/tmp/fill and read back", *fillMiB)},
		{big, *bigMem, touch(*touchBig), fmt.Sprintf("%d MiB of random data in a tmpfs", *touchBig)},
		{little, *bigMem, touch(*touchLow), fmt.Sprintf("%d MiB of random data in a tmpfs", *touchLow)},
	} {
		took, _, err := b.boxd.CLI(ctx, "create", c.name, "--memory", c.mem, "--ssh-key", b.key+".pub")
		if err != nil {
			return err
		}
		uctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
		used, _, err := b.boxd.CLI(uctx, "exec", "--no-stdin", c.name, "--", "sh", "-c", c.use)
		cancel()
		if err != nil {
			return fmt.Errorf("using box %s's memory: %w", c.name, err)
		}
		benchkit.Progress("created box %s (%s) in %s; %s in %s", c.name, c.mem, secs(took), c.what, secs(used))
	}
	return nil
}

func (b *bench) daemonLog() string { return benchkit.DaemonLog(b.dir) }

// startDaemon starts the root's daemon, restoring eagerly when eager, with
// --debug (a line per restore) and no spare machines (a resume starts
// none: one QEMU per box, and nothing else on the CPUs after it).
func (b *bench) startDaemon(ctx context.Context, eager bool) error {
	args := []string{"--ssh-listen", "127.0.0.1:" + b.port, "--idle-hibernate", "0", "--warm-forks", "0", "--debug"}
	if eager {
		args = append(args, "--eager-restore")
	}
	d, err := b.boxd.StartDaemon(ctx, b.daemonLog(), args...)
	if err != nil {
		return err
	}
	b.daemon, b.eager = d, eager
	benchkit.Progress("boxd daemon up (pid %d, %s restores): SSH front door on 127.0.0.1:%s", d.Pid(), modeName(eager), b.port)
	return nil
}

// stopDaemon stops the daemon with SIGTERM (it hibernates running boxes
// first).
func (b *bench) stopDaemon() error {
	err := b.daemon.Stop()
	b.daemon = nil
	return err
}

// modeName names a daemon's way of restoring.
func modeName(eager bool) string {
	if eager {
		return "eager"
	}
	return "lazy"
}

// sshTrue runs `true` in box name through the daemon's SSH front door with
// the real OpenSSH client, a fresh connection, no configuration file, and
// the run's key only.
func (b *bench) sshTrue(ctx context.Context, name string) (time.Duration, error) {
	took, _, err := benchkit.Timed(ctx, "ssh", "-F", "none",
		"-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", b.key,
		"-p", b.port, name+"@127.0.0.1", "true")
	return took, err
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port), nil
}

// tearDown removes the boxes, stops the daemon, checks that no QEMU of the
// root is left (killing any), drops what boxd kept of the boxes
// (benchkit.Boxd.Clean), and removes the run's folder. Between phases no
// daemon runs: one is started to remove the boxes. A second call does
// nothing.
func (b *bench) tearDown() error {
	if b == nil || b.tornDown {
		return nil
	}
	b.tornDown = true
	var errs []error
	if b.daemon == nil && b.port != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		err := b.startDaemon(ctx, false)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("starting the daemon to remove the boxes: %w", err))
		}
	}
	c, err := b.boxd.Clean(b.daemon)
	b.daemon, b.cleanup = nil, c
	errs = append(errs, err)
	if b.work != "" {
		if err := os.RemoveAll(b.work); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// showDaemonLog prints the end of the daemon's log on stderr.
func (b *bench) showDaemonLog() {
	if b != nil {
		benchkit.ShowTail(b.daemonLog(), 20)
	}
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
