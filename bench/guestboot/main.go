// Command guestboot measures Linux boxes under QEMU, in one run, beside
// baselines measured in the same run:
//
//   - boot: a box (boxd's default image on a qcow2 overlay over its base
//     file, the Debian cloud kernel, boxd's initramfs with boxd-agent as
//     /init, started by the qemu runner) from Start to the agent answering
//     (agent.Dial), beside QEMU's bare boot of the same kernel with a busybox
//     initramfs whose /init powers off at once (process start to exit);
//   - exec: round trips of `true` through the agent beside a host-local
//     exec of `true`;
//   - snapshot: its time and the bytes it adds to the store, beside what the
//     box's memory file and disk overlay hold;
//   - resume: a restore of that snapshot until the agent answers, beside the
//     cold boot;
//   - fork: Freeze of a running box and two restores of it, until both run
//     and both agents answer, beside the cold boot: of a booted box without
//     spares and with two (QEMUs started ahead, qemu.Machine.StartSpares), and of
//     a resumed box (a machine on a private mapping of a frozen file).
//
// The store, the image, the kernel and the caches are kept in a root folder
// between runs (-root); each run's snapshots are removed, and the store
// collected, at the end (and at the start, should a run have been cut
// short). Every QEMU is stopped at the end; they die with the process too.
// See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

var (
	jsonOut    = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	reps       = flag.Int("reps", 3, "how many times each boot, snapshot, resume and fork is measured")
	execs      = flag.Int("execs", 50, "exec round trips of `true` through the agent, and host execs of `true`")
	memMiB     = flag.Int64("mem", 512, "guest memory in MiB (boxes and the bare boot alike)")
	cpus       = flag.Int("cpus", 1, "vCPUs (boxes and the bare boot alike)")
	rootDir    = flag.String("root", benchkit.EnvOr("BOXD_BENCH_GUEST_ROOT", "/var/tmp/boxd-bench-guest"), "boxd root kept between runs: the store with the image, the kernel, the initramfs and base file caches")
	treeCache  = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder whose debootstrap-bookworm tree the image is built from when it is there (else guest.BuildImage runs debootstrap itself)")
	agentPath  = flag.String("agent", "", "the boxd-agent binary (default: $BOXD_AGENT, else beside this program, else in PATH)")
	kernelPath = flag.String("kernel", "", "a kernel with the virtio drivers built in (default: Debian's cloud kernel, fetched into the root)")
	timeout    = flag.Duration("ready-timeout", 3*time.Minute, "how long one box may take to answer")
)

// snapPrefix starts the name of every snapshot the benchmark takes, so a run
// can find what an earlier one left.
const snapPrefix = "bench-"

func main() {
	benchkit.Main("guestboot", badFlags, "guest memory goes to /dev/shm and boxes read their snapshots' frozen files", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	if *reps < 1 || *execs < 1 || *memMiB < 64 || *cpus < 1 {
		return "-reps and -execs must be at least 1, -mem at least 64, -cpus at least 1"
	}
	return ""
}

func run(ctx context.Context) error {
	b, err := setUp(ctx)
	if b != nil {
		// Runs on every path: the machines stop before the snapshots go.
		defer b.tearDown()
	}
	if err != nil {
		return err
	}
	rep, err := b.measure(ctx)
	if err != nil {
		return err
	}
	return benchkit.Print(os.Stdout, *jsonOut, rep, printTable)
}

// setUp opens the root, clears what an earlier run left, and makes or
// finds what the boots need. The bench it returns (also on failure, once
// there is one) must be torn down.
func setUp(ctx context.Context) (*bench, error) {
	root, err := filepath.Abs(*rootDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	g, err := snapshotter.Open(root)
	if err != nil {
		return nil, fmt.Errorf("opening the store in %s: %w", root, err)
	}
	b := &bench{g: g, root: root, mem: *memMiB << 20}
	if err := b.clearSnapshots(ctx); err != nil {
		return b, fmt.Errorf("clearing an earlier run's snapshots: %w", err)
	}
	if b.work, err = os.MkdirTemp(root, "run-"); err != nil {
		return b, err
	}
	// Guest memory lives on a tmpfs, as the runner wants it.
	if b.memDir, err = os.MkdirTemp("/dev/shm", "boxd-bench-guest-"); err != nil {
		return b, err
	}
	b.r = &qemu.Runner{Dir: filepath.Join(b.work, "machines"), MemDir: b.memDir, Graph: g}
	if err := os.MkdirAll(b.r.Dir, 0o700); err != nil {
		return b, err
	}
	benchkit.Progress("root %s (kept), this run's files in %s and %s", root, b.work, b.memDir)

	t := time.Now()
	if b.kernel, b.modules, err = guest.Kernel(ctx, root, *kernelPath); err != nil {
		return b, err
	}
	agentBin := *agentPath
	if agentBin == "" {
		if agentBin, err = guest.AgentPath(); err != nil {
			return b, err
		}
	}
	if b.initrd, err = guest.Initramfs(ctx, root, b.modules, agentBin); err != nil {
		return b, err
	}
	benchkit.Progress("kernel %s, initramfs %s (%.1fs)", b.kernel, b.initrd, time.Since(t).Seconds())

	t = time.Now()
	if b.img, err = ensureImage(ctx, g, *treeCache); err != nil {
		return b, err
	}
	if b.base, err = guest.BaseFile(ctx, g, b.img.Name, guest.BaseDir(root)); err != nil {
		return b, err
	}
	benchkit.Progress("image %s (snapshot %s, %s), base file %s (%.1fs)", b.img.Name, b.img.Snapshot, benchkit.Size(b.img.Size), b.base, time.Since(t).Seconds())

	if b.bareInitrd, err = writeBareInitramfs(filepath.Join(b.work, "bare-initrd.gz")); err != nil {
		return b, fmt.Errorf("the bare boot's initramfs: %w", err)
	}
	return b, nil
}

// ensureImage returns the default image, building it first if the store
// lacks it: from the pre-fetched debootstrap tree under cache when that is
// complete (holding its lock while the tree is read), else by debootstrap.
func ensureImage(ctx context.Context, g *snapshotter.Graph, cache string) (guest.Image, error) {
	if img, err := guest.GetImage(g, guest.DefaultImage); err == nil {
		return img, nil
	} else if !errors.Is(err, errdefs.ErrNotFound) {
		return guest.Image{}, err
	}
	opts := guest.BuildOptions{Name: guest.DefaultImage, Progress: buildProgress()}
	tree, unlock, err := benchkit.CachedTree(cache, guest.DefaultImage)
	if err != nil {
		return guest.Image{}, err
	}
	defer unlock()
	opts.Tree = tree
	return guest.BuildImage(ctx, g, opts)
}

// buildProgress reports each stage of an image build once, as it starts.
func buildProgress() func(stage string, done, total int64) {
	last := ""
	return func(stage string, _, _ int64) {
		if stage != last {
			last = stage
			benchkit.Progress("  image build: %s", stage)
		}
	}
}
