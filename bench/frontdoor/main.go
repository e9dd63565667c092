// Command frontdoor measures boxd's front door from the outside, as a user
// meets it: the boxd CLI and the real OpenSSH client against a boxd daemon
// of a private root, beside baselines measured on the same machine in the
// same run:
//
//   - ssh connect-to-command (`ssh -p PORT BOX@127.0.0.1 true`, a fresh
//     connection each time) to a running box, beside the same client to a
//     stock OpenSSH sshd on the host and beside `boxd exec BOX -- true`;
//   - the same to a hibernated box, which the connection wakes, beside
//     `boxd resume` followed by the ssh;
//   - `ssh BOX 'cat >/dev/null'` of -upload MiB to the running box, and as
//     much downloaded, beside the same with sshd, and `boxd exec BOX -- true`
//     while such an upload runs, beside the same with the box idle;
//   - `boxd fork SRC NEW` and `--count 2` until the CLI returns, beside a
//     cold `boxd create`;
//   - `boxd ls` and `boxd ls --json` (and the API's list) with 1 box and
//     with 100, beside the same with 1 box and the bare start-up of the
//     boxd binary.
//
// The root (store, image, kernel) is kept between runs; every box the run
// makes is removed, with the snapshots boxd keeps of it, and the daemon and
// the private sshd are stopped at the end, on an error or a signal too. See
// bench/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

var (
	jsonOut    = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	reps       = flag.Int("reps", 20, "ssh and exec round trips to the running box (and to sshd)")
	wakeReps   = flag.Int("wake-reps", 5, "ssh connections that wake the hibernated box (and resume-then-ssh baselines)")
	forkReps   = flag.Int("fork-reps", 3, "forks of each kind, and cold creates for their baseline")
	lsReps     = flag.Int("ls-reps", 10, "runs of each ls")
	uploadMiB  = flag.Int("upload", 64, "MiB each upload sends and each download receives (0: no such rows)")
	uploadReps = flag.Int("upload-reps", 3, "uploads of each kind: to the box, to sshd, and to the box with execs beside it")
	boxes      = flag.Int("boxes", 100, "boxes that exist for the big ls (the measured box, the seed and forks of the seed)")
	batch      = flag.Int("batch", 10, "forks made at once for the big ls; each batch is hibernated before the next")
	memory     = flag.String("mem", "512M", "memory of the measured box and the cold creates (boxd's default)")
	manyMem    = flag.String("many-mem", "128M", "memory of the seed box the many are forked from")
	dir        = flag.String("dir", benchkit.EnvOr("BOXD_BENCH_FRONTDOOR_DIR", "/var/tmp/boxd-bench-frontdoor"), "kept folder: the boxd root (store, image, kernel) in DIR/root and the daemon's log")
	treeCache  = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder whose debootstrap-bookworm tree the image is built from when it is complete (else boxd image build runs debootstrap)")
	boxdBin    = flag.String("boxd", benchkit.EnvOr("BOXD", "bin/boxd"), "the boxd binary")
)

func main() {
	benchkit.Main("frontdoor", badFlags, "boxd's daemon runs QEMU with guest memory in /dev/shm, and the baseline sshd logs in as root", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	if *reps < 1 || *wakeReps < 1 || *forkReps < 1 || *lsReps < 1 || *boxes < 3 || *batch < 1 {
		return "-reps, -wake-reps, -fork-reps, -ls-reps and -batch must be at least 1, -boxes at least 3"
	}
	if *uploadMiB < 0 || *uploadReps < 1 {
		return "-upload must not be negative, -upload-reps must be at least 1"
	}
	return ""
}

func run(ctx context.Context) error {
	b, err := setUp(ctx)
	if b != nil {
		// Runs on every path (a second call does nothing): the boxes go,
		// then the daemon and sshd.
		defer func() {
			if err := b.tearDown(); err != nil {
				fmt.Fprintf(os.Stderr, "frontdoor: cleaning up: %v\n", err)
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
