package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

const testSize = 32 << 20

// needTools skips a test on a machine without the e2fsprogs it drives.
func needTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "debugfs", "e2fsck"} {
		if _, err := lookTool(tool); err != nil {
			t.Skipf("needs %s (Debian package e2fsprogs; scripts/deps.sh installs it)", tool)
		}
	}
}

// tinyTree writes a small root filesystem tree.
func tinyTree(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tree")
	files := map[string]string{
		"etc/os-release":                    "PRETTY_NAME=\"boxd test\"\n",
		"etc/hostname":                      "host-machine\n",
		"etc/resolv.conf":                   "nameserver 192.0.2.1\n",
		"usr/bin/hello":                     "#!/bin/sh\necho hello\n",
		"var/cache/apt/archives/bash_1.deb": "a package",
		"root/.profile":                     "# profile\n",
	}
	for name, data := range files {
		p := filepath.Join(dir, name)
		must(t, os.MkdirAll(filepath.Dir(p), 0o755))
		must(t, os.WriteFile(p, []byte(data), 0o644))
	}
	must(t, os.WriteFile(filepath.Join(dir, "usr/bin/big"), bytes.Repeat([]byte("boxd"), 1<<18), 0o644))
	return dir
}

// debugfs runs debugfs's request on an ext4 image and returns its output.
func debugfs(t *testing.T, image, request string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command("debugfs", "-R", request, image)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("debugfs -R %q %s: %v: %s", request, image, err, stderr.String())
	}
	return stdout.String()
}

// fsck checks an ext4 image without changing it.
func fsck(t *testing.T, image string) {
	t.Helper()
	if out, err := exec.Command("e2fsck", "-fn", image).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn %s: %v\n%s", image, err, out)
	}
}

func TestConfigureTree(t *testing.T) {
	tree := tinyTree(t)
	// A file hard-linked from elsewhere must not change: BuildImage stages
	// cached trees with hard links.
	outside := filepath.Join(t.TempDir(), "resolv.conf")
	must(t, os.WriteFile(outside, []byte("nameserver 192.0.2.9\n"), 0o644))
	must(t, os.Remove(filepath.Join(tree, "etc/resolv.conf")))
	must(t, os.Link(outside, filepath.Join(tree, "etc/resolv.conf")))
	must(t, os.Symlink("../run/systemd/hosts", filepath.Join(tree, "etc/hosts")))
	must(t, os.Chmod(filepath.Join(tree, "root"), 0o755))

	must(t, ConfigureTree(tree))

	want := map[string]string{
		"etc/hostname":    "boxd\n",
		"etc/resolv.conf": "nameserver 10.0.2.3\n",
		"etc/machine-id":  "",
		"etc/os-release":  "PRETTY_NAME=\"boxd test\"\n",
	}
	for name, data := range want {
		got, err := os.ReadFile(filepath.Join(tree, name))
		if err != nil || string(got) != data {
			t.Errorf("/%s = %q, %v; want %q", name, got, err, data)
		}
	}
	for name, has := range map[string]string{"etc/hosts": "127.0.1.1\tboxd", "etc/fstab": "/dev/vda\t/\text4"} {
		fi, err := os.Lstat(filepath.Join(tree, name))
		got, _ := os.ReadFile(filepath.Join(tree, name))
		if err != nil || !fi.Mode().IsRegular() || !strings.Contains(string(got), has) {
			t.Errorf("/%s: %v, %q; want a file with %q", name, err, got, has)
		}
	}
	if got, _ := os.ReadFile(outside); string(got) != "nameserver 192.0.2.9\n" {
		t.Errorf("a hard-linked file was written into: %q", got)
	}
	if fi, _ := os.Stat(filepath.Join(tree, "root")); fi.Mode().Perm() != 0o700 {
		t.Errorf("/root mode %v, want 0700", fi.Mode())
	}
	if debs, _ := filepath.Glob(filepath.Join(tree, "var/cache/apt/archives/*.deb")); len(debs) > 0 {
		t.Errorf("debootstrap's packages left: %v", debs)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(tree, "etc/.*")); len(leftovers) > 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
	if err := ConfigureTree(t.TempDir()); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("an empty folder: want invalid argument, got %v", err)
	}
}

func TestImageFromTree(t *testing.T) {
	needTools(t)
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	tree := tinyTree(t)
	var stages []string
	progress := func(stage string, done, total int64) {
		if len(stages) == 0 || stages[len(stages)-1] != stage {
			stages = append(stages, stage)
		}
		if stage == StageStore && (done < 0 || done > total || total != testSize) {
			t.Errorf("store progress %d of %d", done, total)
		}
	}
	leftover := filepath.Join(g.Root(), "cache", "build", "tiny-tree-123", "root")
	must(t, os.MkdirAll(leftover, 0o755))
	img, err := ImageFromTree(ctx, g, "tiny", tree, TreeOptions{Size: testSize - 1000, Labels: map[string]string{LabelSource: "a test"}, Progress: progress})
	must(t, err)
	if img.Name != "tiny" || img.Snapshot != "image.tiny" || img.Size != testSize || img.Source != "a test" || time.Since(img.Built) > time.Minute {
		t.Fatalf("image %+v", img)
	}
	if want := []string{StageMkfs, StageStore}; !slices.Equal(stages, want) {
		t.Errorf("stages %v, want %v", stages, want)
	}
	s, err := g.Get("image.tiny")
	must(t, err)
	if s.Labels[LabelImage] != "tiny" || s.Labels[LabelBuilt] == "" || len(s.Maps) != 1 || s.Maps[0].Kind != snapshotter.KindDisk {
		t.Fatalf("snapshot %+v", s)
	}
	if got, err := GetImage(g, "tiny"); err != nil || got != img {
		t.Fatalf("GetImage: %+v, %v; want %+v", got, err, img)
	}
	work, _ := os.ReadDir(filepath.Join(g.Root(), "cache", "build"))
	if len(work) > 0 {
		t.Errorf("work files left: %v", work)
	}

	base, err := BaseFile(ctx, g, "tiny", t.TempDir())
	must(t, err)
	fsck(t, base)
	if got := debugfs(t, base, "cat /usr/bin/hello"); got != "#!/bin/sh\necho hello\n" {
		t.Errorf("/usr/bin/hello in the image: %q", got)
	}
	if out, err := exec.Command("e2label", base).Output(); err != nil || strings.TrimSpace(string(out)) != "boxd-root" {
		t.Errorf("label %q, %v; want boxd-root", out, err)
	}
	if st := debugfs(t, base, "stat /"); !strings.Contains(st, "User:     0   Group:     0") {
		t.Errorf("the root folder is not owned by root:\n%s", st)
	}

	if _, err := ImageFromTree(ctx, g, "tiny", tree, TreeOptions{Size: testSize}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("a second image of the name: want already exists, got %v", err)
	}
	// Replace, then refuse to replace one that others are based on.
	must(t, os.WriteFile(filepath.Join(tree, "usr/bin/hello"), []byte("#!/bin/sh\necho again\n"), 0o755))
	img2, err := ImageFromTree(ctx, g, "tiny", tree, TreeOptions{Size: testSize, Replace: true})
	must(t, err)
	if !img2.Built.After(img.Built) && img2.Built != img.Built {
		t.Errorf("replaced image built %v, before %v", img2.Built, img.Built)
	}
	base2, err := BaseFile(ctx, g, "tiny", filepath.Dir(base))
	must(t, err)
	if base2 == base {
		t.Fatalf("a rebuilt image got the old base file %s", base)
	}
	if got := debugfs(t, base2, "cat /usr/bin/hello"); got != "#!/bin/sh\necho again\n" {
		t.Errorf("/usr/bin/hello in the rebuilt image: %q", got)
	}
	if _, err := os.Stat(base); err != nil {
		t.Errorf("the old base file went away: %v", err)
	}
	_, err = g.Ingest(ctx, strings.NewReader("changed"), snapshotter.IngestOptions{Name: "box1", Parent: "image.tiny"})
	must(t, err)
	_, err = ImageFromTree(ctx, g, "tiny", tree, TreeOptions{Size: testSize, Replace: true})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), "box1") {
		t.Errorf("replacing an image a snapshot is based on: want a refusal naming box1, got %v", err)
	}

	// A snapshot that only has an image's name is not replaced.
	_, err = g.Ingest(ctx, strings.NewReader("mine"), snapshotter.IngestOptions{Name: SnapshotName("mine")})
	must(t, err)
	_, err = ImageFromTree(ctx, g, "mine", tree, TreeOptions{Size: testSize, Replace: true})
	if !errors.Is(err, errdefs.ErrAlreadyExists) || !strings.Contains(err.Error(), "not image") {
		t.Errorf("replacing a snapshot that is not an image: want a refusal, got %v", err)
	}

	imgs, err := ListImages(g)
	must(t, err)
	if len(imgs) != 1 || imgs[0].Name != "tiny" {
		t.Errorf("ListImages: %+v", imgs)
	}
}

func TestImageFromTreeRefuses(t *testing.T) {
	needTools(t)
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	tree := tinyTree(t)
	must(t, os.WriteFile(filepath.Join(tree, "usr/bin/huge"), bytes.Repeat([]byte{1}, 40<<20), 0o644))
	tests := []struct {
		name, image, tree string
		size              int64
		want              error
		says              string
	}{
		{"tree too big", "big", tree, testSize, errdefs.ErrInvalidArgument, "choose at least"},
		{"size too small", "small", tree, 1 << 20, errdefs.ErrInvalidArgument, "outside the sizes"},
		{"bad name", "no/slash", tree, testSize, errdefs.ErrInvalidArgument, "invalid name"},
		{"name too long", strings.Repeat("a", 125), tree, testSize, errdefs.ErrInvalidArgument, "invalid name"},
		{"no tree", "none", filepath.Join(tree, "none"), testSize, fs.ErrNotExist, ""},
		{"a file", "file", filepath.Join(tree, "etc/hostname"), testSize, errdefs.ErrInvalidArgument, "not a folder"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ImageFromTree(ctx, g, tt.image, tt.tree, TreeOptions{Size: tt.size})
			if !errors.Is(err, tt.want) || !strings.Contains(fmt.Sprint(err), tt.says) {
				t.Fatalf("want %v saying %q, got %v", tt.want, tt.says, err)
			}
		})
	}
	if imgs, _ := ListImages(g); len(imgs) != 0 {
		t.Fatalf("refused builds left images: %+v", imgs)
	}
}

// TestBaseFile compares the exported base file with the disk mkfs made, and
// checks that a second call reuses it.
func TestBaseFile(t *testing.T) {
	needTools(t)
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	disk := filepath.Join(t.TempDir(), "disk.ext4")
	must(t, makeFS(ctx, tinyTree(t), disk, testSize))
	_, err := storeDisk(ctx, g, SnapshotName("tiny"), disk, map[string]string{LabelImage: "tiny"}, false, nil)
	must(t, err)

	dir := filepath.Join(t.TempDir(), "images")
	base, err := BaseFile(ctx, g, "tiny", dir)
	must(t, err)
	if !strings.HasPrefix(filepath.Base(base), "image.tiny-") || !strings.HasSuffix(base, ".raw") || filepath.Dir(base) != dir {
		t.Errorf("base file %s, want %s/image.tiny-KEY.raw", base, dir)
	}
	want, err := os.ReadFile(disk)
	must(t, err)
	got, err := os.ReadFile(base)
	must(t, err)
	if !bytes.Equal(got, want) {
		t.Fatalf("base file differs from the disk mkfs made (%d vs %d bytes)", len(got), len(want))
	}
	fi, err := os.Stat(base)
	must(t, err)
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("base file mode %v, want 0444", fi.Mode())
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Blocks*512 > testSize/2 {
		t.Errorf("base file takes %d bytes of %d: not sparse", st.Blocks*512, testSize)
	}
	again, err := BaseFile(ctx, g, "tiny", dir)
	must(t, err)
	fi2, err := os.Stat(again)
	must(t, err)
	if again != base || !os.SameFile(fi, fi2) {
		t.Errorf("second call gave %s (a new file: %v), want %s reused", again, !os.SameFile(fi, fi2), base)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("files in %s: %v, want the base file only", dir, entries)
	}
	// Same content, same key: an image made again from the same disk
	// shares the file.
	must(t, g.Remove(SnapshotName("tiny")))
	_, err = storeDisk(ctx, g, SnapshotName("tiny"), disk, map[string]string{LabelImage: "tiny"}, false, nil)
	must(t, err)
	if same, err := BaseFile(ctx, g, "tiny", dir); err != nil || same != base {
		t.Errorf("same disk, base file %s, %v; want %s", same, err, base)
	}

	if _, err := BaseFile(ctx, g, "none", dir); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown image: want not found, got %v", err)
	}
	_, err = g.Ingest(ctx, strings.NewReader("x"), snapshotter.IngestOptions{Name: SnapshotName("plain")})
	must(t, err)
	if _, err := BaseFile(ctx, g, "plain", dir); !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "not an image") {
		t.Errorf("a snapshot without the image label: want not found, got %v", err)
	}
}

// fakeDebootstrap puts a debootstrap on PATH that makes a tiny tree (or
// fails, when $FAKE_DEBOOTSTRAP_FAIL is set) and logs its arguments; it
// returns the log's path.
func fakeDebootstrap(t *testing.T) string {
	t.Helper()
	bin := t.TempDir()
	log := filepath.Join(bin, "calls")
	script := `#!/bin/sh
echo "$@" >> ` + log + `
eval target=\${$(($# - 1))}
echo "I: Retrieving InRelease"
echo "I: Validating Packages"
if [ -n "$FAKE_DEBOOTSTRAP_FAIL" ]; then
	mkdir -p "$target/etc"
	echo "E: Couldn't download packages: bash" >&2
	exit 1
fi
mkdir -p "$target/etc" "$target/usr/bin" "$target/var/cache/apt/archives" "$target/root"
echo 'VERSION_CODENAME=bookworm' > "$target/etc/os-release"
echo 'fake' > "$target/var/cache/apt/archives/bash_5.deb"
echo "$FAKE_DEBOOTSTRAP_MARK" > "$target/usr/bin/mark"
echo "I: Base system installed successfully."
`
	must(t, os.WriteFile(filepath.Join(bin, "debootstrap"), []byte(script), 0o755))
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	t.Setenv("FAKE_DEBOOTSTRAP_FAIL", "")
	return log
}

func calls(t *testing.T, log string) []string {
	b, err := os.ReadFile(log)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	must(t, err)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// stageLog records the stages a build reports.
type stageLog struct {
	mu     sync.Mutex
	stages []string
	steps  int64
}

func (l *stageLog) progress(stage string, done, total int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.stages) == 0 || l.stages[len(l.stages)-1] != stage {
		l.stages = append(l.stages, stage)
	}
	if stage == StageFetch {
		l.steps = done
	}
}

func TestBuildImageFetches(t *testing.T) {
	needTools(t)
	if os.Geteuid() != 0 {
		t.Skip("debootstrap needs root")
	}
	log := fakeDebootstrap(t)
	ctx := context.Background()
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	cache := filepath.Join(g.Root(), "cache", "rootfs", "debian-bookworm")
	opts := BuildOptions{Size: testSize, Mirror: "http://mirror.example/debian"}

	var sl stageLog
	var out bytes.Buffer
	opts.Progress, opts.Log = sl.progress, &out
	t.Setenv("FAKE_DEBOOTSTRAP_MARK", "one")
	img, err := BuildImage(ctx, g, opts)
	must(t, err)
	wantCall := "--variant=minbase --include=procps,iproute2,ca-certificates,less,nano bookworm " + cache + ".partial/tree http://mirror.example/debian"
	if c := calls(t, log); len(c) != 1 || c[0] != wantCall {
		t.Fatalf("debootstrap calls %q, want [%q]", c, wantCall)
	}
	if want := []string{StageFetch, StageConfigure, StageMkfs, StageStore}; !slices.Equal(sl.stages, want) || sl.steps != 3 {
		t.Errorf("stages %v with %d fetch steps; want %v with 3", sl.stages, sl.steps, want)
	}
	if !strings.Contains(out.String(), "I: Base system installed successfully.") {
		t.Errorf("debootstrap's output did not reach the log: %q", out.String())
	}
	wantSource := "debootstrap --variant=minbase --include=procps,iproute2,ca-certificates,less,nano bookworm http://mirror.example/debian"
	if img.Name != DefaultImage || img.Snapshot != "image.debian-bookworm" || img.Source != wantSource {
		t.Fatalf("image %+v, want source %q", img, wantSource)
	}
	s, _ := g.Get(img.Snapshot)
	if s.Labels[LabelPackages] != "minbase,procps,iproute2,ca-certificates,less,nano" {
		t.Errorf("labels %v", s.Labels)
	}
	for _, p := range []string{cache + ".partial", cache + ".old"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left", p)
		}
	}
	if _, err := os.Stat(filepath.Join(cache, "tree", "var/cache/apt/archives/bash_5.deb")); err != nil {
		t.Errorf("configuring changed the cached tree: %v", err)
	}
	base, err := BaseFile(ctx, g, DefaultImage, t.TempDir())
	must(t, err)
	if got := debugfs(t, base, "cat /etc/hostname"); got != "boxd\n" {
		t.Errorf("/etc/hostname in the image: %q", got)
	}
	if got := debugfs(t, base, "ls /var/cache/apt/archives"); strings.Contains(got, ".deb") {
		t.Errorf("packages left in the image: %s", got)
	}

	// Built: returned as it is.
	again, err := BuildImage(ctx, g, opts)
	if err != nil || again != img || len(calls(t, log)) != 1 {
		t.Fatalf("second build: %+v, %v, %d debootstrap calls; want the same image, 1 call", again, err, len(calls(t, log)))
	}
	// Rebuilt from the cached tree: no fetch.
	sl = stageLog{}
	opts.Rebuild = true
	t.Setenv("FAKE_DEBOOTSTRAP_MARK", "two")
	rebuilt, err := BuildImage(ctx, g, opts)
	must(t, err)
	if len(calls(t, log)) != 1 || slices.Contains(sl.stages, StageFetch) || rebuilt.Source != wantSource {
		t.Fatalf("rebuild fetched again (%d calls, stages %v) or lost its source (%q)", len(calls(t, log)), sl.stages, rebuilt.Source)
	}
	// A failed refetch keeps the cache and the image.
	t.Setenv("FAKE_DEBOOTSTRAP_FAIL", "1")
	opts.Refetch = true
	_, err = BuildImage(ctx, g, opts)
	if err == nil || !strings.Contains(err.Error(), "E: Couldn't download packages: bash") || !strings.Contains(err.Error(), "--mirror") ||
		!strings.Contains(err.Error(), cache+".log") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("failing debootstrap: want one line with its error, a hint and where its log is, got %v", err)
	}
	if _, err := os.Stat(cache + ".partial"); err == nil {
		t.Errorf("a failed fetch left %s.partial", cache)
	}
	if got, err := GetImage(g, DefaultImage); err != nil || got != rebuilt {
		t.Errorf("after a failed refetch: %+v, %v; want the image as it was", got, err)
	}
	// A refetch replaces the cached tree.
	t.Setenv("FAKE_DEBOOTSTRAP_FAIL", "")
	t.Setenv("FAKE_DEBOOTSTRAP_MARK", "three")
	_, err = BuildImage(ctx, g, opts)
	must(t, err)
	if mark, _ := os.ReadFile(filepath.Join(cache, "tree", "usr/bin/mark")); string(mark) != "three\n" || len(calls(t, log)) != 3 {
		t.Errorf("refetch: cached tree marked %q after %d calls; want three after 3", mark, len(calls(t, log)))
	}
	base, err = BaseFile(ctx, g, DefaultImage, t.TempDir())
	must(t, err)
	if got := debugfs(t, base, "cat /usr/bin/mark"); got != "three\n" {
		t.Errorf("refetched image has mark %q", got)
	}
}

func TestBuildImageRefuses(t *testing.T) {
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	tests := []struct {
		name string
		opts BuildOptions
		says string
	}{
		{"unknown recipe", BuildOptions{Name: "alpine-3"}, "debian-SUITE"},
		{"unknown suite", BuildOptions{Name: "debian-nosuch"}, "does not know the suite"},
		{"size", BuildOptions{Size: 1 << 20}, "outside the sizes"},
		{"tree is not a root", BuildOptions{Tree: t.TempDir()}, "not a root filesystem tree"},
		{"mirror", BuildOptions{Mirror: "--no-check-gpg"}, "not an http"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := BuildImage(context.Background(), g, tt.opts)
			if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("want invalid argument saying %q, got %v", tt.says, err)
			}
		})
	}
}

// prefetchedTree returns the Debian bookworm tree the integration tests keep
// (BOXD_TEST_CACHE, default /var/cache/boxd-test), so that a test builds the
// real image without downloading it again.
func prefetchedTree(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("BOXD_TEST_CACHE")
	if cache == "" {
		cache = "/var/cache/boxd-test"
	}
	dir := filepath.Join(cache, "debootstrap-bookworm")
	if _, err := os.Stat(dir + ".complete"); err != nil {
		t.Skipf("no pre-fetched Debian tree at %s (the integration tests make it; `boxd image build` fetches its own)", dir)
	}
	return dir
}

// treeDigest hashes the names, modes, links and contents of the files of a
// few folders of a tree, to show the tree did not change.
func treeDigest(t *testing.T, tree string) string {
	h := sha256.New()
	for _, sub := range []string{"etc", "root", "var/cache/apt"} {
		err := filepath.WalkDir(filepath.Join(tree, sub), func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "%s %v %d\n", p, fi.Mode(), fi.Size())
			if fi.Mode().IsRegular() {
				f, err := os.Open(p)
				if err != nil {
					return err
				}
				defer f.Close()
				_, err = io.Copy(h, f)
				return err
			}
			return nil
		})
		must(t, err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// TestBuildImageDebian builds the default image from the pre-fetched
// debootstrap tree and checks it: the files a box needs, a clean
// filesystem, the tree left as it was. It reports each stage's time.
func TestBuildImageDebian(t *testing.T) {
	needTools(t)
	tree := prefetchedTree(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	before := treeDigest(t, tree)
	g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
	var mu sync.Mutex
	var stage string
	stageStart := time.Now()
	start := stageStart
	progress := func(s string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if s != stage {
			if stage != "" {
				t.Logf("%s: %v", stage, time.Since(stageStart).Round(time.Millisecond))
			}
			stage, stageStart = s, time.Now()
		}
	}
	img, err := BuildImage(ctx, g, BuildOptions{Tree: tree, Progress: progress})
	must(t, err)
	t.Logf("%s: %v; build %v in all", stage, time.Since(stageStart).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	if img.Size != DefaultSize || img.Source != "tree "+tree {
		t.Fatalf("image %+v", img)
	}
	if after := treeDigest(t, tree); after != before {
		t.Fatalf("building changed the pre-fetched tree %s", tree)
	}
	start = time.Now()
	if again, err := BuildImage(ctx, g, BuildOptions{Tree: tree}); err != nil || again != img {
		t.Fatalf("second build: %+v, %v", again, err)
	}
	t.Logf("built image found in %v", time.Since(start).Round(time.Millisecond))
	s, err := g.Get(img.Snapshot)
	must(t, err)
	t.Logf("stored: %d non-zero blocks of %d, %d bytes in packs", s.Maps[0].NewChunks+s.Maps[0].ReusedChunks, img.Size/cas.ChunkSize, s.Maps[0].NewStored)

	dir := BaseDir(g.Root())
	start = time.Now()
	base, err := BaseFile(ctx, g, img.Name, dir)
	must(t, err)
	t.Logf("base file exported in %v", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	if again, err := BaseFile(ctx, g, img.Name, dir); err != nil || again != base {
		t.Fatalf("second BaseFile: %s, %v", again, err)
	}
	t.Logf("base file found in %v", time.Since(start).Round(time.Millisecond))
	fsck(t, base)
	checks := map[string]string{
		"/etc/hostname":    "boxd\n",
		"/etc/resolv.conf": "nameserver 10.0.2.3\n",
		"/etc/machine-id":  "",
	}
	for p, want := range checks {
		if got := debugfs(t, base, "cat "+p); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	if got := debugfs(t, base, "cat /usr/lib/os-release"); !strings.Contains(got, "VERSION_CODENAME=bookworm") {
		t.Errorf("/usr/lib/os-release: %q", got)
	}
	if got := debugfs(t, base, "stat /etc/os-release"); !strings.Contains(got, "Type: symlink") {
		t.Errorf("/etc/os-release is no longer Debian's link: %s", got)
	}
	if got := debugfs(t, base, "cat /etc/fstab"); !strings.Contains(got, "/dev/vda") {
		t.Errorf("/etc/fstab: %q", got)
	}
	if got := debugfs(t, base, "ls /var/cache/apt/archives"); strings.Contains(got, ".deb") {
		t.Errorf("packages left in the image: %s", got)
	}
	if got := debugfs(t, base, "stat /usr/bin/bash"); !strings.Contains(got, "Type: regular") {
		t.Errorf("/usr/bin/bash: %s", got)
	}
}

func TestBuildImageRefusesMountedTree(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	tree := tinyTree(t)
	proc := filepath.Join(tree, "proc")
	must(t, os.Mkdir(proc, 0o755))
	testutil.MountTmpfs(t, proc, "size=1m")
	_, err := BuildImage(context.Background(), testutil.OpenGraph(t, t.TempDir(), snapshotter.Open), BuildOptions{Tree: tree, Size: testSize})
	if !errors.Is(err, errdefs.ErrFailedPrecondition) || !strings.Contains(err.Error(), proc) {
		t.Fatalf("a tree with a mount in it: want a refusal naming %s, got %v", proc, err)
	}
}
