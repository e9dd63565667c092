package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/snapshotter"
	ctdsnap "github.com/boxd-dev/boxd/snapshotter/containerd"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/plugins/snapshots/blockfile"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/containerd/v2/plugins/snapshots/overlay"
	"golang.org/x/sys/unix"
)

// The snapshotters, in the order they run and are shown.
const (
	kindBoxd      = "boxd"
	kindNative    = "native"
	kindOverlay   = "overlayfs"
	kindBlockfile = "blockfile"
)

var allKinds = []string{kindBoxd, kindNative, kindOverlay, kindBlockfile}

// bench holds what every snapshotter's run shares.
type bench struct {
	work      string // the work folder
	imageSize int64
	scratch   string // blockfile's scratch image, made once
	layers    *layers
	rootfs    string
	cpuprof   string
	cl        *cleaner
	mnts      int // mount folders made so far
}

// instance is one snapshotter opened on its own root.
type instance struct {
	kind string
	root string // everything it keeps on disk is under root
	sn   snapshots.Snapshotter
	g    *snapshotter.Graph // boxd's store, for its report
}

func (b *bench) open(kind, root string) (*instance, error) {
	in := &instance{kind: kind, root: root}
	var err error
	switch kind {
	case kindBoxd:
		// As `boxd snapshotter` lays it out: the store in root,
		// containerd's records and the images in root/containerd.
		if in.g, err = snapshotter.Open(root); err != nil {
			return nil, err
		}
		in.sn, err = ctdsnap.NewSnapshotter(filepath.Join(root, "containerd"), in.g, ctdsnap.WithDefaultSize(b.imageSize))
		if err != nil {
			in.g.Close()
			return nil, err
		}
	case kindNative:
		in.sn, err = native.NewSnapshotter(root)
	case kindOverlay:
		in.sn, err = overlay.NewSnapshotter(root)
	case kindBlockfile:
		// The scratch image is copied into root (root/scratch) when the
		// snapshotter starts, and every snapshot without a parent
		// starts as a copy of it.
		in.sn, err = blockfile.NewSnapshotter(root,
			blockfile.WithScratchFile(b.scratch),
			blockfile.WithFSType("ext4"),
			blockfile.WithMountOptions([]string{"loop"}))
	default:
		return nil, fmt.Errorf("unknown snapshotter %q", kind)
	}
	if err != nil {
		return nil, err
	}
	b.cl.addCloser(in.close)
	return in, nil
}

// close closes the snapshotter and boxd's store; twice is not an error.
func (in *instance) close() error {
	var errs []error
	if in.sn != nil {
		errs = append(errs, in.sn.Close())
		in.sn = nil
	}
	if in.g != nil {
		errs = append(errs, in.g.Close())
		in.g = nil
	}
	return errors.Join(errs...)
}

// makeScratch makes blockfile's scratch image as containerd's blockfile
// documentation says: a file of the image size formatted by mkfs.ext4
// (here sparse, not written with dd), then loop-mounted to remove its
// lost+found, since containerd expects a new snapshot's root to be empty.
func (b *bench) makeScratch(ctx context.Context) error {
	b.scratch = filepath.Join(b.work, "blockfile-scratch.img")
	f, err := os.Create(b.scratch)
	if err != nil {
		return err
	}
	err = f.Truncate(b.imageSize)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		mkfs = "/usr/sbin/mkfs.ext4"
	}
	if out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", b.scratch).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", b.scratch, err, strings.TrimSpace(string(out)))
	}
	mnt, err := b.mountDir("scratch")
	if err != nil {
		return err
	}
	if err := mount.All([]mount.Mount{{Type: "ext4", Source: b.scratch, Options: []string{"loop"}}}, mnt); err != nil {
		return fmt.Errorf("mounting the scratch image: %w", err)
	}
	rerr := os.Remove(filepath.Join(mnt, "lost+found"))
	if err := unmount(mnt); err != nil {
		return err
	}
	return rerr
}

// mountDir makes a fresh, empty folder to mount on.
func (b *bench) mountDir(what string) (string, error) {
	b.mnts++
	dir := filepath.Join(b.work, "mnt", fmt.Sprintf("%03d-%s", b.mnts, what))
	return dir, os.MkdirAll(dir, 0o700)
}

// unmount undoes mount.All at dir and removes the folder.
func unmount(dir string) error {
	if err := mount.UnmountAll(dir, 0); err != nil {
		return fmt.Errorf("unmounting %s: %w", dir, err)
	}
	return os.Remove(dir)
}

// Steps are the times, in seconds, of the steps of unpacking one layer as
// containerd does it.
type Steps struct {
	Prepare float64 `json:"prepare"`
	Mount   float64 `json:"mount"`
	Apply   float64 `json:"apply"`
	Unmount float64 `json:"unmount"`
	Commit  float64 `json:"commit"`
	Total   float64 `json:"total"`
	// Sync is a sync(2) right after the commit: the writeback the
	// unpack left behind (not part of Total).
	Sync float64 `json:"sync_after"`
}

func since(t time.Time) float64 { return time.Since(t).Seconds() }

// unpack applies layer as snapshot name on parent ("" for none), the way
// containerd's unpacker does: Prepare an active snapshot, mount it, apply
// the layer's tar stream into the mount, unmount, Commit. A sync(2), not
// timed, goes before it so that no step pays for earlier writeback.
func (b *bench) unpack(ctx context.Context, in *instance, name, parent string, layer []byte) (st Steps, err error) {
	if err := ctx.Err(); err != nil {
		return st, err
	}
	unix.Sync()
	key := "extract-" + name
	t0 := time.Now()
	mounts, err := in.sn.Prepare(ctx, key, parent)
	st.Prepare = since(t0)
	if err != nil {
		return st, fmt.Errorf("prepare %s: %w", key, err)
	}
	committed := false
	defer func() {
		if !committed {
			if rerr := in.sn.Remove(ctx, key); rerr != nil {
				benchkit.Progress("%s: removing active snapshot %s after a failure: %v", in.kind, key, rerr)
			}
		}
	}()
	mnt, err := b.mountDir(in.kind + "-" + name)
	if err != nil {
		return st, err
	}
	t := time.Now()
	if err := mount.All(mounts, mnt); err != nil {
		return st, fmt.Errorf("mounting %s: %w", key, err)
	}
	st.Mount = since(t)
	t = time.Now()
	_, aerr := archive.Apply(ctx, mnt, bytes.NewReader(layer))
	st.Apply = since(t)
	t = time.Now()
	uerr := unmount(mnt)
	st.Unmount = since(t)
	if aerr != nil || uerr != nil {
		return st, errors.Join(aerr, uerr)
	}
	t = time.Now()
	if err := in.sn.Commit(ctx, name, key); err != nil {
		return st, fmt.Errorf("commit %s as %s: %w", key, name, err)
	}
	committed = true
	st.Commit = since(t)
	st.Total = since(t0)
	t = time.Now()
	unix.Sync()
	st.Sync = since(t)
	return st, nil
}

// Container is one container snapshot prepared on an image and mounted.
type Container struct {
	Prepare float64 `json:"prepare"`
	Mount   float64 `json:"mount"`
	Total   float64 `json:"total"`
}

// Disk is the room a snapshotter's root takes.
type Disk struct {
	// DuBytes is `du -sb ROOT`: apparent sizes, so a sparse image counts
	// in full.
	DuBytes int64 `json:"du_sb_bytes"`
	// AllocatedBytes is `du -s --block-size=1 ROOT`: the blocks
	// allocated.
	AllocatedBytes int64 `json:"allocated_bytes"`
}

// BoxdStore is boxd's own account of its store (what `boxd store report`
// prints).
type BoxdStore struct {
	StoredBytes     int64   `json:"stored_bytes"`
	UniqueBytes     int64   `json:"unique_bytes"`
	ReferencedBytes int64   `json:"referenced_bytes"`
	PackBytes       int64   `json:"pack_bytes"`
	IndexBytes      int64   `json:"index_bytes"`
	DedupRatio      float64 `json:"dedup_ratio"`
	Snapshots       int     `json:"snapshots"`
	// PerSnapshot is what each graph snapshot added (`store report`'s
	// per_snapshot rows).
	PerSnapshot []BoxdSnapshot `json:"per_snapshot"`
	// Files are the apparent sizes of the root's parts.
	Files map[string]int64 `json:"files"`
}

// BoxdSnapshot is one graph snapshot's row of the report.
type BoxdSnapshot struct {
	Name               string `json:"name"`
	Label              string `json:"containerd_name"`
	NewBytes           int64  `json:"new_bytes"`
	WrittenStoredBytes int64  `json:"written_stored_bytes"`
}

// UsageOf is what the snapshotter's Usage says of a committed snapshot.
type UsageOf struct {
	Snapshot string `json:"snapshot"`
	Bytes    int64  `json:"bytes"`
	Inodes   int64  `json:"inodes"`
}

// boxdFiles sums the apparent sizes of the parts of boxd's root.
func boxdFiles(root string) (map[string]int64, error) {
	parts := map[string]int64{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(rel, "cas/packs/"):
			rel = "cas/packs/*"
		case strings.HasPrefix(rel, "containerd/images/"):
			rel = "containerd/images/*"
		}
		parts[rel] += fi.Size()
		return nil
	})
	return parts, err
}

// Result is one snapshotter's figures.
type Result struct {
	Snapshotter string `json:"snapshotter"`
	// OneLayer is the unpack of the root filesystem as one layer.
	OneLayer *Steps `json:"unpack_one_layer,omitempty"`
	// TwoLayers is the unpack of the same root filesystem as two layers
	// (all but /etc, then /etc), in a fresh root.
	TwoLayers      []Steps `json:"unpack_two_layers,omitempty"`
	TwoLayersTotal float64 `json:"unpack_two_layers_total,omitempty"`
	// Tops are the unpacks of the images' small top layers on the base.
	Tops []Steps `json:"top_layers,omitempty"`
	// Containers are the container snapshots prepared on the images and
	// mounted, one per image.
	Containers []Container `json:"containers,omitempty"`
	// DiskWithContainers is the root with the images and the containers
	// prepared; Disk is the root once the containers are removed.
	DiskWithContainers *Disk      `json:"disk_with_containers,omitempty"`
	Disk               *Disk      `json:"disk,omitempty"`
	Boxd               *BoxdStore `json:"boxd_store,omitempty"`
	// Usage is the snapshotter's Usage of the base and of image-1.
	Usage []UsageOf `json:"usage,omitempty"`
	// Verified is the number of entries of container-1 checked against
	// the root filesystem.
	Verified int    `json:"verified_entries"`
	Error    string `json:"error,omitempty"`
}

// run measures one snapshotter: the one-layer unpack of the base and the
// images' top layers on it, containers on every image, the disk, then the
// two-layer unpack in a fresh root. Each root is removed when done.
func (b *bench) run(ctx context.Context, kind string) (res Result) {
	res.Snapshotter = kind
	if err := b.runMain(ctx, kind, &res); err != nil {
		res.Error = err.Error()
		return res
	}
	if err := b.runTwoLayers(ctx, kind, &res); err != nil {
		res.Error = err.Error()
	}
	return res
}

func (b *bench) runMain(ctx context.Context, kind string, res *Result) error {
	root := filepath.Join(b.work, "roots", kind)
	in, err := b.open(kind, root)
	if err != nil {
		return fmt.Errorf("opening: %w", err)
	}
	defer b.dropRoot(in)

	benchkit.Progress("%s: unpacking the root filesystem as one layer (%s)", kind, mib(int64(len(b.layers.full))))
	var prof *os.File
	if kind == kindBoxd && b.cpuprof != "" {
		if prof, err = os.Create(b.cpuprof); err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(prof); err != nil {
			prof.Close()
			return err
		}
	}
	st, err := b.unpack(ctx, in, "base", "", b.layers.full)
	if prof != nil {
		pprof.StopCPUProfile()
		if cerr := prof.Close(); err == nil {
			err = cerr
		}
		benchkit.Progress("%s: CPU profile of the one-layer unpack written to %s", kind, b.cpuprof)
	}
	if err != nil {
		return fmt.Errorf("unpacking the base: %w", err)
	}
	res.OneLayer = &st
	benchkit.Progress("%s: %.2fs (prepare %.2f, mount %.2f, apply %.2f, unmount %.2f, commit %.2f; sync after %.2f)",
		kind, st.Total, st.Prepare, st.Mount, st.Apply, st.Unmount, st.Commit, st.Sync)

	for i, top := range b.layers.tops {
		st, err := b.unpack(ctx, in, imageName(i), "base", top)
		if err != nil {
			return fmt.Errorf("unpacking the top layer of image %d: %w", i+1, err)
		}
		res.Tops = append(res.Tops, st)
	}
	benchkit.Progress("%s: %d images' top layers unpacked on the base, median %.3fs", kind, len(b.layers.tops), median(res.Tops, func(s Steps) float64 { return s.Total }))

	var mnts []string
	var keys []string
	defer func() {
		// On a failure: the containers go too.
		for _, m := range mnts {
			if err := unmount(m); err != nil {
				benchkit.Progress("%s: %v", kind, err)
			}
		}
		for _, k := range keys {
			if err := in.sn.Remove(ctx, k); err != nil {
				benchkit.Progress("%s: removing %s: %v", kind, k, err)
			}
		}
	}()
	for i := range b.layers.tops {
		if err := ctx.Err(); err != nil {
			return err
		}
		unix.Sync()
		key := fmt.Sprintf("container-%d", i+1)
		t0 := time.Now()
		mounts, err := in.sn.Prepare(ctx, key, imageName(i))
		prep := since(t0)
		if err != nil {
			return fmt.Errorf("preparing %s: %w", key, err)
		}
		keys = append(keys, key)
		mnt, err := b.mountDir(kind + "-" + key)
		if err != nil {
			return err
		}
		t := time.Now()
		if err := mount.All(mounts, mnt); err != nil {
			return fmt.Errorf("mounting %s: %w", key, err)
		}
		mnts = append(mnts, mnt)
		res.Containers = append(res.Containers, Container{Prepare: prep, Mount: since(t), Total: since(t0)})
		if _, err := os.Stat(filepath.Join(mnt, addedFileDir, fmt.Sprintf("boxd-bench-image-%d.bin", i+1))); err != nil {
			return fmt.Errorf("container %s does not show its image's file: %w", key, err)
		}
	}
	benchkit.Progress("%s: %d containers prepared and mounted, median %.3fs", kind, len(res.Containers), median(res.Containers, func(c Container) float64 { return c.Total }))
	if err := ctx.Err(); err != nil {
		return err
	}
	benchkit.Progress("%s: checking container-1's tree against the root filesystem (not timed)", kind)
	if res.Verified, err = verifyTree(b.rootfs, mnts[0], modifiedFiles[0], 1); err != nil {
		return fmt.Errorf("container-1 does not hold image-1: %w", err)
	}
	unix.Sync()
	dc, err := measureDisk(ctx, root)
	if err != nil {
		return err
	}
	res.DiskWithContainers = &dc
	for len(mnts) > 0 {
		if err := unmount(mnts[0]); err != nil {
			return err
		}
		mnts = mnts[1:]
	}
	for len(keys) > 0 {
		if err := in.sn.Remove(ctx, keys[0]); err != nil {
			return fmt.Errorf("removing %s: %w", keys[0], err)
		}
		keys = keys[1:]
	}
	unix.Sync()
	d, err := measureDisk(ctx, root)
	if err != nil {
		return err
	}
	res.Disk = &d
	for _, name := range []string{"base", imageName(0)} {
		u, err := in.sn.Usage(ctx, name)
		if err != nil {
			return fmt.Errorf("usage of %s: %w", name, err)
		}
		res.Usage = append(res.Usage, UsageOf{Snapshot: name, Bytes: u.Size, Inodes: u.Inodes})
	}
	if in.g != nil {
		rep, err := in.g.Report(ctx)
		if err != nil {
			return fmt.Errorf("store report: %w", err)
		}
		res.Boxd = &BoxdStore{
			StoredBytes: rep.StoredBytes, UniqueBytes: rep.UniqueBytes, ReferencedBytes: rep.ReferencedBytes,
			PackBytes: rep.Store.PackBytes, IndexBytes: rep.Store.IndexBytes, DedupRatio: rep.DedupRatio, Snapshots: rep.Snapshots,
		}
		for _, p := range rep.PerSnap {
			row := BoxdSnapshot{Name: p.Name, NewBytes: p.NewBytes, WrittenStoredBytes: p.WrittenStoredBytes}
			if snap, err := in.g.Get(p.Name); err == nil {
				row.Label = snap.Labels[ctdsnap.LabelName]
			}
			res.Boxd.PerSnapshot = append(res.Boxd.PerSnapshot, row)
		}
		if res.Boxd.Files, err = boxdFiles(root); err != nil {
			return err
		}
	}
	benchkit.Progress("%s: 5 images take %s (du -sb), %s allocated", kind, mib(res.Disk.DuBytes), mib(res.Disk.AllocatedBytes))
	return nil
}

func (b *bench) runTwoLayers(ctx context.Context, kind string, res *Result) error {
	root := filepath.Join(b.work, "roots", kind+"-two-layers")
	in, err := b.open(kind, root)
	if err != nil {
		return fmt.Errorf("opening: %w", err)
	}
	defer b.dropRoot(in)
	benchkit.Progress("%s: unpacking the root filesystem as two layers (%s + %s) in a fresh root", kind, mib(int64(len(b.layers.lower))), mib(int64(len(b.layers.upper))))
	st, err := b.unpack(ctx, in, "layer-1", "", b.layers.lower)
	if err != nil {
		return fmt.Errorf("unpacking layer 1 of 2: %w", err)
	}
	res.TwoLayers = append(res.TwoLayers, st)
	if st, err = b.unpack(ctx, in, "layer-2", "layer-1", b.layers.upper); err != nil {
		return fmt.Errorf("unpacking layer 2 of 2: %w", err)
	}
	res.TwoLayers = append(res.TwoLayers, st)
	res.TwoLayersTotal = res.TwoLayers[0].Total + res.TwoLayers[1].Total
	benchkit.Progress("%s: %.2fs (%.2f + %.2f)", kind, res.TwoLayersTotal, res.TwoLayers[0].Total, res.TwoLayers[1].Total)
	return nil
}

// dropRoot closes the snapshotter and removes its root, so that the next
// one has the disk to itself.
func (b *bench) dropRoot(in *instance) {
	if err := in.close(); err != nil {
		benchkit.Progress("%s: closing: %v", in.kind, err)
	}
	if err := unmountUnder(filepath.Join(b.work, "mnt")); err != nil {
		benchkit.Progress("%s: %v", in.kind, err)
	}
	if err := detachLoopsUnder(in.root); err != nil {
		benchkit.Progress("%s: %v", in.kind, err)
	}
	if err := os.RemoveAll(in.root); err != nil {
		benchkit.Progress("%s: removing its root: %v", in.kind, err)
	}
}

func imageName(i int) string { return fmt.Sprintf("image-%d", i+1) }

// measureDisk runs du on root.
func measureDisk(ctx context.Context, root string) (Disk, error) {
	du := func(args ...string) (int64, error) {
		out, err := exec.CommandContext(ctx, "du", append(args, root)...).Output()
		if err != nil {
			return 0, fmt.Errorf("du %s %s: %w", strings.Join(args, " "), root, err)
		}
		f := strings.Fields(string(out))
		if len(f) == 0 {
			return 0, fmt.Errorf("du %s: no output", root)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	var d Disk
	var err error
	if d.DuBytes, err = du("-sb"); err != nil {
		return d, err
	}
	d.AllocatedBytes, err = du("-s", "--block-size=1")
	return d, err
}

func median[T any](xs []T, f func(T) float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	v := make([]float64, len(xs))
	for i, x := range xs {
		v[i] = f(x)
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}
