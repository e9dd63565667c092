// Command inside measures a fork of a box made from inside it beside one
// made from the host, on the same box of a private root in the same run:
//
//   - `boxd fork dev kid` from the host: the wall time of the CLI, which
//     returns once the child runs and is unique;
//   - `box fork` in dev, in a script that `boxd exec dev -- sh -c` runs:
//     the time until it returns in the parent, on dev's clock, and until it
//     returns in the child, from the child's clock less dev's;
//
// alternating, each child removed before the next, and the skew of each
// guest's clock against the host's beside them. The root (store, image,
// kernel) is kept between runs; the boxes are removed, with the snapshots
// boxd keeps of them, and the daemon stopped at the end, on an error or a
// signal too. See bench/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

var (
	jsonOut   = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	reps      = flag.Int("reps", 5, "forks of each kind timed, alternating")
	warmUps   = flag.Int("warm-ups", 1, "untimed forks of each kind first")
	memory    = flag.String("mem", "256M", "memory of the box")
	dir       = flag.String("dir", benchkit.EnvOr("BOXD_BENCH_INSIDE_DIR", "/var/tmp/boxd-bench-inside"), "kept folder: the boxd root (store, image, kernel) in DIR/root and the daemon's log")
	treeCache = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder whose debootstrap-bookworm tree the image is built from when it is complete (else boxd image build runs debootstrap)")
	boxdBin   = flag.String("boxd", benchkit.EnvOr("BOXD", "bin/boxd"), "the boxd binary")
)

func main() {
	benchkit.Main("inside", badFlags, "boxd's daemon runs QEMU with guest memory in /dev/shm", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	switch {
	case *reps < 1:
		return "-reps must be at least 1"
	case *warmUps < 0:
		return "-warm-ups must not be negative"
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
				fmt.Fprintf(os.Stderr, "inside: cleaning up: %v\n", err)
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
