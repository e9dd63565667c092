// Command metrics measures what serving Prometheus metrics costs the box
// operations people wait for: `boxd fork` of a running box and `boxd
// resume` of a hibernated one, under a daemon started without
// --metrics-listen (phase A) and under one started with it while the
// bench scrapes /metrics every second (phase B), in alternating phases of
// one run (A B A B …), on one box of a private root.
//
// It prints both sides' percentiles, their ratio and difference, the p50
// of every phase, and what the run's spread lets one conclude about a
// bound of 2%. The root (store, image, kernel) is kept between runs; the
// box is removed, with the snapshots boxd keeps of it, and the daemon
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
	jsonOut   = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	reps      = flag.Int("reps", 10, "forks and resumes timed in each phase")
	rounds    = flag.Int("rounds", 6, "rounds; each is a phase without metrics, then one with metrics scraped")
	warmUps   = flag.Int("warm-ups", 1, "untimed forks and resumes at the start of each phase")
	every     = flag.Duration("scrape-every", time.Second, "how often phase B scrapes /metrics")
	bound     = flag.Float64("bound", 2, "the overhead, in percent of the p50 without metrics, the run is judged against")
	memory    = flag.String("mem", "256M", "memory of the box")
	dir       = flag.String("dir", benchkit.EnvOr("BOXD_BENCH_METRICS_DIR", "/var/tmp/boxd-bench-metrics"), "kept folder: the boxd root (store, image, kernel) in DIR/root and the daemon's log")
	treeCache = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder whose debootstrap-bookworm tree the image is built from when it is complete (else boxd image build runs debootstrap)")
	boxdBin   = flag.String("boxd", benchkit.EnvOr("BOXD", "bin/boxd"), "the boxd binary")
)

func main() {
	benchkit.Main("metrics", badFlags, "boxd's daemon runs QEMU with guest memory in /dev/shm", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	switch {
	case *reps < 1 || *rounds < 1:
		return "-reps and -rounds must be at least 1"
	case *warmUps < 0:
		return "-warm-ups must not be negative"
	case *every < 10*time.Millisecond:
		return "-scrape-every must be at least 10ms"
	case *bound <= 0:
		return "-bound must be above 0"
	}
	return ""
}

func run(ctx context.Context) error {
	b, err := setUp(ctx)
	if b != nil {
		// Runs on every path (a second call does nothing): the box goes,
		// then the daemon.
		defer func() {
			if err := b.tearDown(); err != nil {
				fmt.Fprintf(os.Stderr, "metrics: cleaning up: %v\n", err)
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
