package cli

import (
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/remote"
	"github.com/urfave/cli/v2"
)

func daemonCommand() *cli.Command {
	return &cli.Command{
		Name:  "daemon",
		Usage: "serve the boxes of the root: the API the box commands use, and the SSH front door (ssh NAME@host), until SIGINT or SIGTERM",
		Description: "The API is HTTP/JSON on the unix socket ROOT/" + daemon.SocketName + " (root only). The SSH front door's host key\n" +
			"is ROOT/" + daemon.HostKeyName + ". A running box nobody has used (no SSH connection, no exec, under a quarter of a CPU) for\n" +
			"--idle-hibernate is hibernated; the next SSH connection resumes it. On SIGINT or SIGTERM every\n" +
			"running box is hibernated before the daemon exits, so a restart loses nothing; with --leave-running\n" +
			"running boxes are left running instead, for the next daemon on the root to adopt (an upgrade). A\n" +
			"daemon that is killed or crashes leaves them running too: the next one adopts them the same way.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Usage: "folder holding boxd's store and metadata (default: the global --root)"},
			&cli.StringFlag{Name: "ssh-listen", Value: daemon.DefaultSSHListen, Usage: "address of the SSH front door"},
			&cli.DurationFlag{Name: "idle-hibernate", Value: daemon.DefaultIdleHibernate, Usage: "hibernate a running box idle this long (0 never)"},
			&cli.DurationFlag{Name: "compact-after", Usage: "compact the store's fresh packs into zstd packs once the API has been quiet this long, such as 30s (default 0: never): the store gets smaller, and a page read from a compacted pack decodes its whole frame, which slows the lazy resume of a box whose memory is in it"},
			&cli.StringFlag{Name: "kernel", Usage: "boot boxes with this kernel instead of Debian's cloud kernel"},
			&cli.IntFlag{Name: "warm-forks", Value: box.DefaultSpares, Usage: "spare machines kept waiting, paused, for a fork of each running box (0 none): a fork then starts no process"},
			&cli.BoolFlag{Name: "live-forks", Usage: "a fork copies the box's memory live, with QEMU's dirty tracking, so that the box stands stopped only for the last pages it wrote and its device state; under KVM, or QEMU 9.0 or later under TCG (QEMU before 9.0 loses pages a guest under TCG writes during the copy: forks then copy files)"},
			&cli.BoolFlag{Name: "eager-restore", Usage: "a resume rebuilds a box's whole memory from its snapshot before the box runs, instead of serving its pages from the store while it runs (to compare the two)"},
			&cli.IntFlag{Name: "disk-layers", Usage: "the layers a box's disk may gather over its image, one a hibernation or fork, before boxd copies them into the box's top in the background: more keeps resumes slower, fewer copies the box's data more often (0: the default, 6; -1: never)"},
			&cli.DurationFlag{Name: "lazy-grace", Usage: "how long after a lazily resumed box starts the part of its memory it has not asked for waits before it is pushed to it (0: none where boxd places pages straight into the box's memory, else 500ms)"},
			&cli.BoolFlag{Name: "fork-moves-parent", Usage: "a fork freezes its running parent's memory as the fork's instead of copying it, and the parent goes on in a new machine on it, its SSH sessions with it"},
			&cli.StringFlag{Name: "metrics-listen", Usage: "serve Prometheus metrics on this host:port (/metrics), e.g. 127.0.0.1:9464 (default: none)"},
			&cli.BoolFlag{Name: "metrics-allow-remote", Usage: "let --metrics-listen be an address other hosts can reach"},
			&cli.StringFlag{Name: "containerd-snapshotter", Usage: "serve containerd's snapshots API (a proxy snapshotter named boxd in containerd's config) on this unix socket, so that containerd's containers run in boxes (runtime io.containerd.boxd.v2)"},
			&cli.BoolFlag{Name: "leave-running", Usage: "on SIGINT or SIGTERM leave running boxes running for the next daemon to adopt, instead of hibernating them"},
			&cli.StringFlag{Name: "remote", Usage: "share boxes with other hosts through this S3 bucket, s3://BUCKET/PREFIX (endpoint and credentials: the AWS_* environment or the shared AWS files): a hibernation is pushed there, a resume of a box another host pushed pulls it"},
			&cli.StringFlag{Name: "remote-cache-size", Usage: "with --remote: keep at most this much of the local store's packs that the bucket holds too (such as 20G), evicting the least recently read first; packs not pushed yet are never evicted (default: no bound)"},
			&cli.BoolFlag{Name: "debug", Usage: "log every API error and SSH refusal"},
		},
		Action: runDaemon,
	}
}

// rootDir returns the root a command works on, absolute: its own --root if
// it has one, else the global one.
func rootDir(c *cli.Context) (string, error) {
	var root string
	for _, cc := range c.Lineage() {
		if root = cc.String("root"); root != "" {
			break
		}
	}
	if root == "" {
		return "", usageError("--root must not be empty")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return "", usageError("--root %s: %v", root, err)
	}
	return abs, nil
}

func runDaemon(c *cli.Context) error {
	if c.NArg() != 0 {
		return usageError("boxd daemon takes no arguments (got %q)", c.Args().First())
	}
	root, err := rootDir(c)
	if err != nil {
		return err
	}
	if c.Duration("compact-after") < 0 {
		return usageError("--compact-after %s is negative", c.Duration("compact-after"))
	}
	if c.Duration("idle-hibernate") < 0 {
		return usageError("--idle-hibernate %s is negative", c.Duration("idle-hibernate"))
	}
	if c.String("metrics-listen") != "" {
		if err := daemon.CheckMetricsAddr(c.String("metrics-listen"), c.Bool("metrics-allow-remote")); err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
	}
	if r := c.String("remote"); r != "" {
		if _, _, err := remote.ParseURL(r); err != nil {
			return usageError("--remote: %v", err)
		}
	}
	var cacheLimit int64
	if v := c.String("remote-cache-size"); v != "" {
		if c.String("remote") == "" {
			return usageError("--remote-cache-size needs --remote")
		}
		n, err := parseSize(v)
		if err != nil {
			return fmt.Errorf("--remote-cache-size: %w", err)
		}
		cacheLimit = n
	}
	warm := c.Int("warm-forks")
	switch {
	case warm < 0 || warm > 16:
		return usageError("--warm-forks %d: want 0 to 16", warm)
	case warm == 0:
		warm = -1 // none
	}
	level := slog.LevelInfo
	if c.Bool("debug") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
	return daemon.Run(c.Context, daemon.Config{
		Root:                  root,
		SSHListen:             c.String("ssh-listen"),
		IdleHibernate:         c.Duration("idle-hibernate"),
		CompactAfter:          c.Duration("compact-after"),
		Kernel:                c.String("kernel"),
		Spares:                warm,
		ForkMovesParent:       c.Bool("fork-moves-parent"),
		EagerRestore:          c.Bool("eager-restore"),
		LiveForks:             c.Bool("live-forks"),
		LazyGrace:             c.Duration("lazy-grace"),
		DiskLayers:            c.Int("disk-layers"),
		LeaveRunning:          c.Bool("leave-running"),
		ContainerdSnapshotter: c.String("containerd-snapshotter"),
		Remote:                c.String("remote"),
		RemoteCacheLimit:      cacheLimit,
		Logger:                log,

		MetricsListen:      c.String("metrics-listen"),
		MetricsAllowRemote: c.Bool("metrics-allow-remote"),
		Ready: func(i daemon.Info) {
			metrics := ""
			if i.MetricsAddr != "" {
				metrics = ", metrics on http://" + i.MetricsAddr + "/metrics"
			}
			fmt.Fprintf(c.App.Writer, "boxd daemon on %s: API on %s, SSH on %s%s\n", i.Root, i.Socket, i.SSHAddr, metrics)
		},
	})
}
