// Command lazy measures boxd's lazy restores beside its eager ones, in one
// run: the resume of a hibernated box until its vCPUs run (the daemon's
// log) and until its agent answers (`boxd resume`), `ssh BOX true` that
// wakes a hibernated box through boxd's SSH front door, the resume of a box
// hibernated while an upload streamed into it, how the resume of
// a 2 GiB box that touched 1 GiB compares with one that touched 100 MiB,
// and the host memory of a resumed box a minute later. Rounds alternate a
// daemon that restores lazily (the default) with one started with
// --eager-restore, so that load from other work falls on both.
//
// The root (store, image, kernel) is kept between runs; every box the run
// makes is removed, with the snapshots boxd keeps of it, and the daemon
// stopped at the end, on an error or a signal too. See bench/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

var (
	jsonOut     = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	rounds      = flag.Int("rounds", 2, "rounds; each is a lazy phase, then an eager one")
	reps        = flag.Int("reps", 3, "timed resumes, wakes by ssh, and resumes of each 2 GiB box, in each phase")
	idle        = flag.Duration("idle", time.Minute, "how long a resumed box idles before its host memory is read")
	memory      = flag.String("mem", "512M", "memory of the measured box (boxd's default)")
	fillMiB     = flag.Int("fill", 256, "MiB the measured box writes to a file and reads back once created, to fill its page cache")
	bigMem      = flag.String("big-mem", "2G", "memory of the two boxes that touch -touch-big and -touch-small MiB")
	touchBig    = flag.Int("touch-big", 1024, "MiB of random data one big-memory box writes into a tmpfs")
	touchLow    = flag.Int("touch-small", 100, "MiB of random data the other writes")
	dir         = flag.String("dir", benchkit.EnvOr("BOXD_BENCH_LAZY_DIR", "/var/tmp/boxd-bench-lazy"), "kept folder: the boxd root (store, image, kernel) in DIR/root and the daemon's log")
	treeCache   = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder whose debootstrap-bookworm tree the image is built from when it is complete (else boxd image build runs debootstrap)")
	warmUps     = flag.Int("warm-ups", 1, "untimed resume and hibernate cycles of each box in each phase before the timed ones (and before -compact): each records more of the box's working set")
	compact     = flag.Bool("compact", false, "compact the store (boxd store compact) before each phase's timed resumes, so that they read memory from zstd frames, as from a store the daemon compacted in a quiet spell")
	frameChunks = flag.Int("frame-chunks", 0, "with -compact, the chunks a zstd frame holds (boxd store compact --frame-chunks; 0: its default)")
	uploadMiB   = flag.Int("upload", 24, "MiB an upload streams into dev (ssh dev sha256sum) while it hibernates and resumes, for the busy resume's row (0: no such row)")
	boxdBin     = flag.String("boxd", benchkit.EnvOr("BOXD", "bin/boxd"), "the boxd binary")
)

func main() {
	benchkit.Main("lazy", badFlags, "boxd's daemon runs QEMU with guest memory in /dev/shm, and the bench reads QEMU's /proc/PID/smaps_rollup", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	switch {
	case *rounds < 1 || *reps < 1 || *warmUps < 1:
		return "-rounds, -reps and -warm-ups must be at least 1"
	case *frameChunks < 0 || *frameChunks > 255:
		return "-frame-chunks must be 0 (the default) to 255"
	case *frameChunks > 0 && !*compact:
		return "-frame-chunks applies to -compact's compaction: give -compact too"
	case *idle < 0:
		return "-idle must not be negative"
	case *fillMiB < 0 || *touchBig < 1 || *touchLow < 1:
		return "-fill must not be negative, -touch-big and -touch-small must be at least 1"
	case *uploadMiB < 0 || *uploadMiB > 4096:
		return "-upload must be 0 (no busy resumes) to 4096 MiB"
	}
	return ""
}

func run(ctx context.Context) error {
	b, err := setUp(ctx)
	if b != nil {
		// Runs on every path (a second call does nothing): the boxes go,
		// then the daemon.
		defer func() {
			if err := b.tearDown(); err != nil {
				fmt.Fprintf(os.Stderr, "lazy: cleaning up: %v\n", err)
			}
		}()
	}
	if err != nil {
		b.showDaemonLog()
		return err
	}
	rep, err := b.measure(ctx)
	if err != nil {
		b.showDaemonLog()
		return err
	}
	// Clean up before printing, so that the table can say what was left.
	if err := b.tearDown(); err != nil {
		return fmt.Errorf("cleaning up: %w", err)
	}
	rep.Cleanup = b.cleanup
	return benchkit.Print(os.Stdout, *jsonOut, rep, printTable)
}
