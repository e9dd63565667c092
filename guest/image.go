package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Stages of a build, as BuildOptions.Progress and TreeOptions.Progress
// report them.
const (
	// StageFetch is debootstrap at work: done counts the steps it has
	// announced; total is -1 (unknown).
	StageFetch = "fetch"
	// StageConfigure stages and configures the tree: done is 0, then 1 of 1.
	StageConfigure = "configure"
	// StageMkfs makes the ext4 filesystem: done is 0, then 1 of 1.
	StageMkfs = "mkfs"
	// StageStore ingests the disk into the store: done and total in bytes.
	StageStore = "store"
)

// Labels on an image's snapshot.
const (
	LabelImage    = "boxd.image"          // the image's name; what marks a snapshot as an image
	LabelBuilt    = "boxd.image.built"    // when it was built, RFC 3339
	LabelSource   = "boxd.image.source"   // where its files came from
	LabelPackages = "boxd.image.packages" // what was installed beyond debootstrap's minbase
)

// snapshotPrefix starts the name of every image's snapshot.
const snapshotPrefix = "image."

// Image sizes.
const (
	DefaultSize = 4 << 30
	MinSize     = 32 << 20
)

// Image is a root disk image for boxes, kept as a disk snapshot.
type Image struct {
	Name     string    `json:"name"`
	Snapshot string    `json:"snapshot"`
	Size     int64     `json:"size"` // the disk's size in bytes
	Built    time.Time `json:"built"`
	Source   string    `json:"source,omitempty"`
}

// SnapshotName returns the name of image name's snapshot.
func SnapshotName(name string) string { return snapshotPrefix + name }

// BuildOptions say which image BuildImage makes and how.
type BuildOptions struct {
	// Name is the image, debian-SUITE ("" means DefaultImage).
	Name string
	// Size is the disk's size in bytes, rounded up to a MiB (0 means
	// DefaultSize). The disk is sparse: free space costs nothing.
	Size int64
	// Mirror is the Debian mirror ("" means Mirror(suite)).
	Mirror string
	// Rebuild builds the image again even if it exists, replacing it.
	Rebuild bool
	// Refetch runs debootstrap again rather than reusing the cached tree;
	// it implies Rebuild.
	Refetch bool
	// Tree, if set, is a root filesystem tree already made (by debootstrap)
	// to build from instead of fetching one. It is staged and configured in
	// a copy; the tree itself is not changed. Its packages are what it has.
	Tree string
	// Progress, if set, is told of each stage's progress (see StageFetch).
	Progress func(stage string, done, total int64)
	// Log, if set, receives debootstrap's output.
	Log io.Writer
}

// buildMu serialises builds in this process: a second build of an image
// waits for the first and then finds it made.
var buildMu sync.Mutex

// BuildImage returns the image opts.Name, building it first if it does not
// exist yet (or opts.Rebuild): debootstrap --variant=minbase with
// DefaultPackages into a tree cached under the root's cache/rootfs (reused
// unless opts.Refetch), configured for a box (ConfigureTree) in a staged
// copy, made an ext4 filesystem of opts.Size, and stored as a disk snapshot
// (ImageFromTree).
//
// A rebuild is refused if snapshots are based on the image. It replaces the
// snapshot only once the new disk is made; should boxd stop between removing
// the old snapshot and storing the new one, the image is gone and the next
// build makes it again from the cached tree.
func BuildImage(ctx context.Context, g *snapshotter.Graph, opts BuildOptions) (Image, error) {
	if opts.Name == "" {
		opts.Name = DefaultImage
	}
	suite, err := suiteOf(opts.Name)
	if err != nil {
		return Image{}, err
	}
	size, err := checkSize(opts.Size)
	if err != nil {
		return Image{}, err
	}
	opts.Rebuild = opts.Rebuild || opts.Refetch
	buildMu.Lock()
	defer buildMu.Unlock()
	img, err := GetImage(g, opts.Name)
	switch {
	case err == nil && !opts.Rebuild:
		return img, nil
	case err == nil:
		if err := replaceable(g, img.Snapshot); err != nil {
			return Image{}, err
		}
	case !errors.Is(err, errdefs.ErrNotFound):
		return Image{}, err
	}

	labels := map[string]string{}
	tree := opts.Tree
	if tree != "" {
		if tree, err = filepath.Abs(tree); err != nil {
			return Image{}, err
		}
		if err := looksLikeRoot(tree); err != nil {
			return Image{}, err
		}
		// A staged copy would take in whatever is mounted there.
		if mps, err := mountinfo.Under(tree); err != nil || len(mps) > 0 {
			return Image{}, fmt.Errorf("the tree %s has file systems mounted in it (%s); unmount them first: %w",
				tree, strings.Join(mps, ", "), errors.Join(err, errdefs.ErrFailedPrecondition))
		}
		labels[LabelSource] = "tree " + tree
	} else {
		mirror := opts.Mirror
		if mirror == "" {
			mirror = Mirror(suite)
		}
		if !fetchable(mirror) {
			return Image{}, fmt.Errorf("mirror %q is not an http, https, ftp or file URL: %w", mirror, errdefs.ErrInvalidArgument)
		}
		var source string
		tree, source, err = fetchTree(ctx, fetchOptions{
			cacheDir: filepath.Join(g.Root(), "cache", "rootfs"),
			name:     opts.Name, suite: suite, mirror: mirror,
			packages: DefaultPackages, refetch: opts.Refetch,
			log: opts.Log, progress: opts.Progress,
		})
		if err != nil {
			return Image{}, err
		}
		labels[LabelSource] = source
		labels[LabelPackages] = "minbase," + strings.Join(DefaultPackages, ",")
	}

	report(opts.Progress, StageConfigure, 0, 1)
	work, err := cleanWorkDir(g)
	if err != nil {
		return Image{}, err
	}
	staging, err := os.MkdirTemp(work, opts.Name+"-tree-")
	if err != nil {
		return Image{}, err
	}
	defer removeTree(staging) //nolint:errcheck // a leftover is only space in the cache
	staged := filepath.Join(staging, "root")
	if err := stageTree(ctx, tree, staged); err != nil {
		return Image{}, err
	}
	if err := ConfigureTree(staged); err != nil {
		return Image{}, err
	}
	report(opts.Progress, StageConfigure, 1, 1)
	return imageFromTree(ctx, g, opts.Name, staged, work, TreeOptions{Size: size, Labels: labels, Replace: opts.Rebuild, Progress: opts.Progress})
}

// TreeOptions say how ImageFromTree makes an image.
type TreeOptions struct {
	// Size is the disk's size in bytes, rounded up to a MiB (0 means
	// DefaultSize).
	Size int64
	// Labels are added to the snapshot's. LabelImage is always the image's
	// name; LabelBuilt defaults to now.
	Labels map[string]string
	// Replace replaces an existing image of the name (refused if snapshots
	// are based on it) instead of failing.
	Replace bool
	// Progress, if set, is told of StageMkfs and StageStore.
	Progress func(stage string, done, total int64)
}

// ImageFromTree makes the folder tree, as it is, the root filesystem of
// image name: an ext4 filesystem labelled boxd-root, owned by root at its
// top, in a sparse file of opts.Size, stored as the disk snapshot
// SnapshotName(name). The file is removed once stored.
func ImageFromTree(ctx context.Context, g *snapshotter.Graph, name, tree string, opts TreeOptions) (Image, error) {
	buildMu.Lock()
	defer buildMu.Unlock()
	work, err := cleanWorkDir(g)
	if err != nil {
		return Image{}, err
	}
	return imageFromTree(ctx, g, name, tree, work, opts)
}

// imageFromTree is ImageFromTree with buildMu held and the work folder work.
func imageFromTree(ctx context.Context, g *snapshotter.Graph, name, tree, work string, opts TreeOptions) (Image, error) {
	if err := snapshotter.ValidateName(name); err != nil {
		return Image{}, fmt.Errorf("image: %w", err)
	}
	snap := SnapshotName(name)
	if err := snapshotter.ValidateName(snap); err != nil {
		return Image{}, fmt.Errorf("image: %w", err)
	}
	size, err := checkSize(opts.Size)
	if err != nil {
		return Image{}, err
	}
	if s, err := g.Get(snap); err == nil {
		if !opts.Replace {
			return Image{}, fmt.Errorf("image %q already exists (snapshot %s): %w", name, snap, errdefs.ErrAlreadyExists)
		}
		if s.Labels[LabelImage] != name {
			return Image{}, fmt.Errorf("snapshot %s exists and is not image %q; boxd does not replace it: %w", snap, name, errdefs.ErrAlreadyExists)
		}
		if err := replaceable(g, snap); err != nil {
			return Image{}, err
		}
	}
	if fi, err := os.Stat(tree); err != nil {
		return Image{}, fmt.Errorf("image %q: %w", name, err)
	} else if !fi.IsDir() {
		return Image{}, fmt.Errorf("image %q: %s is not a folder: %w", name, tree, errdefs.ErrInvalidArgument)
	}
	if err := checkFits(tree, size); err != nil {
		return Image{}, err
	}
	f, err := os.CreateTemp(work, name+"-*.ext4")
	if err != nil {
		return Image{}, err
	}
	disk := f.Name()
	f.Close()
	defer os.Remove(disk)
	report(opts.Progress, StageMkfs, 0, 1)
	if err := makeFS(ctx, tree, disk, size); err != nil {
		return Image{}, err
	}
	report(opts.Progress, StageMkfs, 1, 1)
	labels := maps.Clone(opts.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	labels[LabelImage] = name
	if labels[LabelBuilt] == "" {
		labels[LabelBuilt] = time.Now().UTC().Format(time.RFC3339)
	}
	s, err := storeDisk(ctx, g, snap, disk, labels, opts.Replace, opts.Progress)
	if err != nil {
		return Image{}, err
	}
	return imageOf(s), nil
}

// storeDisk ingests the file disk as the disk snapshot snap, first removing
// the snapshot of that name if replace is set.
func storeDisk(ctx context.Context, g *snapshotter.Graph, snap, disk string, labels map[string]string, replace bool, progress func(string, int64, int64)) (snapshotter.Snapshot, error) {
	f, err := os.Open(disk)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	defer f.Close()
	r, err := newSparseReader(f)
	if err != nil {
		return snapshotter.Snapshot{}, err
	}
	if replace {
		if err := g.Remove(snap); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			return snapshotter.Snapshot{}, fmt.Errorf("replacing image: %w", err)
		}
	}
	total := r.size
	report(progress, StageStore, 0, total)
	s, err := g.Ingest(ctx, r, snapshotter.IngestOptions{
		Name: snap, Kind: snapshotter.KindDisk, Labels: labels,
		Progress: func(done int64) { report(progress, StageStore, done, total) },
	})
	if err != nil {
		return snapshotter.Snapshot{}, fmt.Errorf("storing image: %w", err)
	}
	return s, nil
}

// GetImage returns the image called name.
func GetImage(g *snapshotter.Graph, name string) (Image, error) {
	s, err := g.Get(SnapshotName(name))
	if errors.Is(err, errdefs.ErrNotFound) {
		return Image{}, fmt.Errorf("no image %q: build it with boxd image build --name %s: %w", name, name, errdefs.ErrNotFound)
	}
	if err != nil {
		return Image{}, err
	}
	if s.Labels[LabelImage] != name {
		return Image{}, fmt.Errorf("snapshot %s is not an image (no %s=%s label): %w", s.Name, LabelImage, name, errdefs.ErrNotFound)
	}
	return imageOf(s), nil
}

// ListImages returns the images in g: the snapshots labelled LabelImage, by
// name.
func ListImages(g *snapshotter.Graph) ([]Image, error) {
	all, err := g.List()
	if err != nil {
		return nil, err
	}
	var out []Image
	for _, s := range all {
		if s.Labels[LabelImage] != "" {
			out = append(out, imageOf(s))
		}
	}
	slices.SortFunc(out, func(a, b Image) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func imageOf(s snapshotter.Snapshot) Image {
	img := Image{Name: s.Labels[LabelImage], Snapshot: s.Name, Built: s.Created, Source: s.Labels[LabelSource]}
	if m, ok := s.Map(string(snapshotter.KindDisk)); ok {
		img.Size = m.Size
	}
	if t, err := time.Parse(time.RFC3339, s.Labels[LabelBuilt]); err == nil {
		img.Built = t
	}
	return img
}

// replaceable refuses to replace an image's snapshot that others are based on.
func replaceable(g *snapshotter.Graph, snap string) error {
	kids, err := g.Children(snap)
	if err != nil {
		return err
	}
	if len(kids) > 0 {
		return fmt.Errorf("cannot rebuild the image in snapshot %s: snapshots %s are based on it; remove them first: %w",
			snap, strings.Join(kids, ", "), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// checkSize applies the default size and rounds up to a MiB.
func checkSize(size int64) (int64, error) {
	if size == 0 {
		return DefaultSize, nil
	}
	const mib = 1 << 20
	if size < 0 || size > 1<<50 || (size+mib-1)&^(mib-1) < MinSize {
		return 0, fmt.Errorf("an image of %d bytes is outside the sizes boxd makes (%d MiB to 1 PiB): %w", size, MinSize/mib, errdefs.ErrInvalidArgument)
	}
	return (size + mib - 1) &^ (mib - 1), nil
}

// checkFits refuses a size the tree plainly does not fit in, before mkfs
// spends time finding out: it needs the tree's blocks plus a tenth, 16 MiB
// of journal and a twentieth of the disk for inodes and other metadata.
func checkFits(tree string, size int64) error {
	used, err := treeUsage(tree)
	if err != nil {
		return err
	}
	need := used + used/10 + 16<<20
	if avail := size - size/20; avail < need {
		least := (need*20/19 + 1<<20 - 1) >> 20
		return fmt.Errorf("the tree %s takes %d MiB; a disk of %d MiB is too small for it: choose at least %d MiB: %w",
			tree, used>>20, size>>20, least, errdefs.ErrInvalidArgument)
	}
	return nil
}

// treeUsage sums the blocks the files under dir take, each inode once.
func treeUsage(dir string) (int64, error) {
	var used int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			used += fi.Size()
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		used += st.Blocks * 512
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("measuring the tree: %w", err)
	}
	return used, nil
}

// makeFS makes out, a sparse file of size bytes, an ext4 filesystem holding
// tree.
func makeFS(ctx context.Context, tree, out string, size int64) error {
	mkfs, err := lookTool("mkfs.ext4")
	if err != nil {
		return missingTool("mkfs.ext4", "e2fsprogs")
	}
	f, err := os.OpenFile(out, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("making the disk file: %w", err)
	}
	cmd := exec.CommandContext(ctx, mkfs, "-F", "-q", "-d", tree, "-L", "boxd-root", "-E", "root_owner=0:0", out, fmt.Sprintf("%dk", size>>10))
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 -d %s: %w: %s", tree, err, strings.Join(strings.Fields(string(msg)), " "))
	}
	return nil
}

// lookTool finds a command in PATH or in the sbin folders, which a user's
// PATH may lack.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, exec.ErrNotFound)
}

// cleanWorkDir returns the root's build work folder, emptied of what builds
// that did not finish left there. Only one process has a root open, and
// buildMu is held: nothing else is at work in it.
func cleanWorkDir(g *snapshotter.Graph) (string, error) {
	dir := filepath.Join(g.Root(), "cache", "build")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if err := removeTree(filepath.Join(dir, e.Name())); err != nil {
			return "", err
		}
	}
	return dir, nil
}

func report(progress func(string, int64, int64), stage string, done, total int64) {
	if progress != nil {
		progress(stage, done, total)
	}
}
