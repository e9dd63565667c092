// Command snapshotter measures boxd's containerd snapshotter
// (snapshotter/containerd) side by side with containerd's native, overlayfs
// and blockfile snapshotters, in one run, all of them used in-process as
// libraries through containerd's Go API, on the same image: a Debian
// bookworm root filesystem made by `debootstrap --variant=minbase`.
//
// It unpacks the image as containerd does (Prepare, mount, archive.Apply
// of the layer's tar, unmount, Commit), as one layer and as two; prepares
// and mounts a container snapshot on each of five images that share that
// base and differ by a small top layer; and measures the room each
// snapshotter's root takes with the five images. Goals are reported as met
// or not met; a missed goal does not change the exit status.
//
// It needs root (mounts, loop devices), mkfs.ext4 and debugfs (e2fsprogs),
// and, the first time, debootstrap and a Debian mirror. See README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

const images = 5

var (
	jsonOut   = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	cacheDir  = flag.String("cache", benchkit.EnvOr("BOXD_TEST_CACHE", "/var/cache/boxd-test"), "folder holding debootstrap-bookworm, the Debian root filesystem (made there if missing)")
	mirror    = flag.String("mirror", benchkit.EnvOr("BOXD_DEBIAN_MIRROR", "http://deb.debian.org/debian"), "Debian mirror for debootstrap (first run only)")
	imageSize = flag.Int64("image-size", 1<<30, "size in bytes of an image without a parent: boxd's default size and blockfile's scratch image")
	workDir   = flag.String("dir", "", "folder to work in (default: a new folder under $TMPDIR, removed at the end)")
	only      = flag.String("snapshotters", strings.Join(allKinds, ","), "the snapshotters to measure, comma-separated, in order")
	cpuprof   = flag.String("cpuprofile", "", "write a CPU profile (runtime/pprof) of boxd's one-layer unpack to this file")
)

func main() {
	benchkit.ParseFlags("snapshotter")
	code := run()
	if c := interrupted.Load(); c != 0 {
		code = int(c)
	}
	os.Exit(code)
}

// interrupted is the exit status a signal asked for (0 for none).
var interrupted atomic.Int32

func run() int {
	fail := func(err error) int {
		fmt.Fprintf(os.Stderr, "snapshotter: %v\n", err)
		return 1
	}
	if os.Geteuid() != 0 {
		return fail(fmt.Errorf("needs root: it mounts filesystems and loop devices"))
	}
	kinds, err := parseKinds(*only)
	if err != nil {
		fmt.Fprintf(os.Stderr, "snapshotter: %v\n", err)
		return 2
	}
	if err := log.SetLevel("warn"); err != nil {
		return fail(err)
	}

	cl := &cleaner{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A signal stops the run after the step in progress, which then
	// cleans up on its normal path; a second signal, or a step that does
	// not end within two minutes, cleans up at once and exits.
	done := make(chan struct{})
	defer close(done) // after the cleanup below
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		var sig os.Signal
		select {
		case sig = <-sigs:
		case <-done:
			return
		}
		code := int32(130)
		if sig == syscall.SIGTERM {
			code = 143
		}
		interrupted.Store(code)
		benchkit.Progress("%v: stopping after the current step, then cleaning up (again to clean up at once)", sig)
		cancel()
		select {
		case <-done:
			return
		case <-sigs:
		case <-time.After(2 * time.Minute):
		}
		benchkit.Progress("cleaning up at once")
		if err := cl.run(false); err != nil {
			benchkit.Progress("cleanup: %v", err)
		}
		os.Exit(int(code))
	}()
	defer func() {
		if err := cl.run(true); err != nil {
			benchkit.Progress("cleanup: %v", err)
		}
	}()

	work := *workDir
	if work == "" {
		if work, err = os.MkdirTemp("", "boxd-bench-snapshotter-"); err != nil {
			return fail(err)
		}
	} else {
		if work, err = filepath.Abs(work); err != nil {
			return fail(err)
		}
		if err := os.MkdirAll(work, 0o700); err != nil {
			return fail(err)
		}
		if work, err = os.MkdirTemp(work, "boxd-bench-snapshotter-"); err != nil {
			return fail(err)
		}
	}
	cl.mu.Lock()
	cl.work = work
	cl.mu.Unlock()
	benchkit.Progress("working in %s", work)

	rootfs, unlock, err := ensureRootfs(ctx, *cacheDir, *mirror, cl)
	if err != nil {
		return fail(err)
	}
	t := time.Now()
	l, err := buildLayers(ctx, rootfs, images)
	unlock()
	if err != nil {
		return fail(err)
	}
	benchkit.Progress("layers built from %s in %.1fs: the root filesystem %s (%d entries, %s in regular files); as two layers %s + %s (/etc, %d entries); top layers %s each",
		rootfs, since(t), mib(int64(len(l.full))), l.entries, mib(l.contentBytes), mib(int64(len(l.lower))), mib(int64(len(l.upper))), l.upperEntries, mib(int64(len(l.tops[0]))))

	b := &bench{work: work, imageSize: *imageSize, layers: l, rootfs: rootfs, cpuprof: *cpuprof, cl: cl}
	if *cpuprof != "" {
		if b.cpuprof, err = filepath.Abs(*cpuprof); err != nil {
			return fail(err)
		}
	}
	for _, k := range kinds {
		if k == kindBlockfile {
			if err := b.makeScratch(ctx); err != nil {
				return fail(fmt.Errorf("blockfile's scratch image: %w", err))
			}
		}
	}

	rep := Report{
		Machine: machine(work),
		Image: ImageInfo{
			Rootfs: rootfs, Entries: l.entries, FileBytes: l.contentBytes, LayerBytes: int64(len(l.full)),
			LowerBytes: int64(len(l.lower)), UpperBytes: int64(len(l.upper)), UpperEntries: l.upperEntries,
			TopLayerBytes: int64(len(l.tops[0])), Images: images, ImageSize: *imageSize,
		},
	}
	for _, k := range kinds {
		if ctx.Err() != nil {
			break
		}
		res := b.run(ctx, k)
		if res.Error != "" && interrupted.Load() == 0 {
			benchkit.Progress("%s: FAILED: %s", k, res.Error)
			rep.Failures = append(rep.Failures, k+": "+res.Error)
		}
		rep.Results = append(rep.Results, res)
	}
	if interrupted.Load() != 0 {
		return 1
	}
	rep.Goals = goals(rep.Results)

	if err := benchkit.Print(os.Stdout, *jsonOut, rep, printTable); err != nil {
		return fail(err)
	}
	if len(rep.Failures) > 0 {
		return 1
	}
	return 0
}

func parseKinds(s string) ([]string, error) {
	var kinds []string
	for k := range strings.SplitSeq(s, ",") {
		k = strings.TrimSpace(k)
		if k == "" {
			continue
		}
		known := false
		for _, a := range allKinds {
			known = known || a == k
		}
		if !known {
			return nil, fmt.Errorf("-snapshotters: unknown %q (known: %s)", k, strings.Join(allKinds, ", "))
		}
		kinds = append(kinds, k)
	}
	if len(kinds) == 0 {
		return nil, fmt.Errorf("-snapshotters: none given")
	}
	return kinds, nil
}

// Machine says where the run happened.
type Machine struct {
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	WorkFS     string `json:"work_filesystem"`
	Containerd string `json:"containerd"`
}

func machine(work string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), Kernel: benchkit.KernelRelease(), Go: runtime.Version()}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/containerd/containerd/v2" {
				m.Containerd = d.Version
			}
		}
	}
	var st unix.Statfs_t
	if unix.Statfs(work, &st) == nil {
		switch uint32(st.Type) {
		case unix.EXT4_SUPER_MAGIC:
			m.WorkFS = "ext4"
		case unix.XFS_SUPER_MAGIC:
			m.WorkFS = "xfs"
		case unix.BTRFS_SUPER_MAGIC:
			m.WorkFS = "btrfs"
		case unix.TMPFS_MAGIC:
			m.WorkFS = "tmpfs"
		case unix.OVERLAYFS_SUPER_MAGIC:
			m.WorkFS = "overlayfs"
		default:
			m.WorkFS = fmt.Sprintf("0x%x", st.Type)
		}
	}
	return m
}
