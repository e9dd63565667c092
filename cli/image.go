package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/guest"
	"github.com/containerd/errdefs"
	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

func imageCommand() *cli.Command {
	return &cli.Command{
		Name:  "image",
		Usage: "root disk images for boxes: build them into the store, list them",
		Before: func(*cli.Context) error {
			// Storing an image streams it into the store, as store ingest
			// does: the same soft heap limit. GOMEMLIMIT overrides it.
			if os.Getenv("GOMEMLIMIT") == "" {
				debug.SetMemoryLimit(storeMemoryLimit)
			}
			return nil
		},
		Subcommands: []*cli.Command{
			{
				Name:  "build",
				Usage: "build an image (Debian by debootstrap, as an ext4 disk) into the store, unless it is built already",
				Description: "debian-SUITE images are debootstrap's minbase variant plus " + strings.Join(guest.DefaultPackages, ", ") + ",\n" +
					"configured for a box. The debootstrap tree is cached in ROOT/cache/rootfs, so a rebuild fetches nothing\n" +
					"unless --refetch. The disk is stored as the snapshot image.NAME. While the daemon runs, it owns the store\n" +
					"and builds the image; a build of an image it is building joins that build, and ^C here leaves the build to it.",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "name", Value: guest.DefaultImage, Usage: "the image: debian-SUITE"},
					&cli.StringFlag{Name: "size", Value: "4G", Usage: "the disk's size (sparse: free space costs nothing), in bytes or with K, M, G, T"},
					&cli.StringFlag{Name: "mirror", Usage: "the Debian mirror (default: $" + guest.MirrorEnv + ", else the one this host's apt uses, else " + guest.FallbackMirror + ")"},
					&cli.BoolFlag{Name: "rebuild", Usage: "build the image again, replacing it"},
					&cli.BoolFlag{Name: "refetch", Usage: "run debootstrap again instead of using the cached tree (implies --rebuild)"},
					&cli.StringFlag{Name: "tree", Usage: "build from this root filesystem tree, made by debootstrap, instead of fetching one (it is not changed)"},
					jsonFlag,
				},
				Action: imageBuild,
			},
			{Name: "ls", Usage: "list the images in the store (through the daemon while it runs)", Flags: []cli.Flag{jsonFlag}, Action: imageList},
		},
	}
}

// imageArgs refuses positional arguments: the image commands take flags only.
func imageArgs(c *cli.Context) error {
	if c.NArg() != 0 {
		return usageError("boxd image %s takes no arguments (got %q); see boxd image %s --help", c.Command.Name, c.Args().First(), c.Command.Name)
	}
	return nil
}

func imageBuild(c *cli.Context) error {
	if err := imageArgs(c); err != nil {
		return err
	}
	size, err := parseSize(c.String("size"))
	if err != nil {
		return err
	}
	req := daemon.ImageBuildRequest{
		Name:    c.String("name"),
		Size:    size,
		Mirror:  c.String("mirror"),
		Rebuild: c.Bool("rebuild"),
		Refetch: c.Bool("refetch"),
		Tree:    c.String("tree"),
	}
	start := time.Now()
	var img guest.Image
	var existed bool
	if dc := runningDaemon(c); dc != nil {
		// The daemon owns the store while it runs: it builds.
		var res daemon.ImageBuildResult
		if res, err = daemonBuild(c, dc, req); err != nil {
			return err
		}
		img, existed = res.Image, res.Existed
	} else if img, existed, err = directBuild(c, req); err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, img)
	}
	w := c.App.Writer
	if existed {
		fmt.Fprintf(w, "image %s is built (snapshot %s, %s, built %s); --rebuild builds it again\n",
			img.Name, img.Snapshot, size2(img.Size), img.Built.Local().Format(time.DateTime))
		return nil
	}
	fmt.Fprintf(w, "image %s built in %s: snapshot %s, %s disk\n  from %s\n",
		img.Name, time.Since(start).Round(100*time.Millisecond), img.Snapshot, size2(img.Size), img.Source)
	return nil
}

// directBuild builds the image req names in the store under --root, which
// this process opens; it says whether the image existed already.
func directBuild(c *cli.Context, req daemon.ImageBuildRequest) (guest.Image, bool, error) {
	g, err := openGraph(c)
	if err != nil {
		return guest.Image{}, false, err
	}
	defer g.Close()
	existed := false
	if !req.Rebuild && !req.Refetch {
		_, err := guest.GetImage(g, req.Name)
		existed = err == nil
	}
	show, finish := buildProgress(c)
	img, err := guest.BuildImage(c.Context, g, guest.BuildOptions{
		Name:     req.Name,
		Size:     req.Size,
		Mirror:   req.Mirror,
		Rebuild:  req.Rebuild,
		Refetch:  req.Refetch,
		Tree:     req.Tree,
		Progress: show,
	})
	finish()
	return img, existed, err
}

// daemonBuild has the daemon build the image req names, showing its
// progress as directBuild does. The tree and the mirror are resolved here,
// as this process would build: a tree relative to this folder, the mirror
// of this environment. Interrupted, it says that the daemon goes on.
func daemonBuild(c *cli.Context, dc *daemon.Client, req daemon.ImageBuildRequest) (daemon.ImageBuildResult, error) {
	if req.Tree != "" {
		abs, err := filepath.Abs(req.Tree)
		if err != nil {
			return daemon.ImageBuildResult{}, err
		}
		req.Tree = abs
	}
	if req.Mirror == "" {
		req.Mirror = os.Getenv(guest.MirrorEnv)
	}
	if req.Name == "" {
		req.Name = guest.DefaultImage
	}
	show, finish := buildProgress(c)
	res, err := dc.BuildImage(c.Context, req, show)
	finish()
	if errors.Is(err, context.Canceled) && c.Err() != nil {
		fmt.Fprintf(c.App.ErrWriter, "boxd: interrupted; the daemon goes on building image %s (boxd image ls lists it once built)\n", req.Name)
		return res, commandExit(130)
	}
	return res, err
}

// firstUse builds the default image through the daemon d unless its store
// holds it, showing progress, so that a box made from the default image
// can be made on a new root. An image named on the command line is not
// built: creating a box of it fails if it is missing.
func firstUse(c *cli.Context, d *daemon.Client) error {
	imgs, err := d.Images(c.Context)
	if errors.Is(err, errdefs.ErrNotFound) {
		// A daemon older than the image routes: create says what is
		// missing.
		return nil
	}
	if err != nil {
		return err
	}
	for _, img := range imgs {
		if img.Name == guest.DefaultImage {
			return nil
		}
	}
	say(c, "building image %s (first use)…", guest.DefaultImage)
	if _, err := daemonBuild(c, d, daemon.ImageBuildRequest{Name: guest.DefaultImage}); err != nil {
		var exit commandExit
		if errors.As(err, &exit) {
			return err
		}
		return fmt.Errorf("building image %s for its first use: %w", guest.DefaultImage, err)
	}
	return nil
}

func imageList(c *cli.Context) error {
	if err := imageArgs(c); err != nil {
		return err
	}
	imgs, err := daemonOrLocal(c,
		func(dc *daemon.Client) ([]guest.Image, error) { return dc.Images(c.Context) },
		guest.ListImages)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		if imgs == nil {
			imgs = []guest.Image{}
		}
		return printJSON(c, imgs)
	}
	rows := [][]string{{"NAME", "SNAPSHOT", "SIZE", "BUILT"}}
	for _, img := range imgs {
		rows = append(rows, []string{img.Name, img.Snapshot, size2(img.Size), img.Built.Local().Format(time.DateTime)})
	}
	table(c.App.Writer, rows)
	return nil
}

// size2 formats a disk size: whole units without decimals ("4 GiB").
func size2(n int64) string {
	s := size(n)
	if i := strings.Index(s, ".00 "); i >= 0 {
		s = s[:i] + s[i+3:]
	}
	return s
}

// parseSize reads a size in bytes, or with a binary unit: K, M, G or T,
// alone or followed by B or iB ("4G", "512MiB").
func parseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	shift := 0
	if t != "" {
		if i := strings.IndexByte("KMGT", t[len(t)-1]); i >= 0 {
			shift = 10 * (i + 1)
			t = t[:len(t)-1]
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil || n <= 0 || n > (1<<62)>>shift {
		return 0, usageError("size %q is not a positive size such as 4G, 512M or 1073741824", s)
	}
	return n << shift, nil
}

// stageNames are how a build's stages read on a terminal.
var stageNames = map[string]string{
	guest.StageFetch:     "fetching (debootstrap)",
	guest.StageConfigure: "configuring",
	guest.StageMkfs:      "making the filesystem",
	guest.StageStore:     "storing",
}

// buildProgress shows a build's stages on stderr when it is a terminal and
// JSON was not asked for: a line for each stage that has no measure, a
// counter of debootstrap's steps, a progress bar while storing. The second
// function ends the display.
func buildProgress(c *cli.Context) (func(stage string, done, total int64), func()) {
	f, ok := c.App.ErrWriter.(*os.File)
	if wantJSON(c) || !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	var (
		cur    string
		update func(int64)
		end    = func() {}
	)
	show := func(stage string, done, total int64) {
		if stage != cur {
			end()
			cur, update, end = stage, nil, func() {}
			switch stage {
			case guest.StageStore:
				update, end = progress(c, total, stageNames[stage])
			case guest.StageFetch:
				bar := progressbar.NewOptions64(-1,
					progressbar.OptionSetWriter(f),
					progressbar.OptionSetDescription(stageNames[stage]),
					progressbar.OptionShowCount(),
					progressbar.OptionSetItsString("steps"),
					progressbar.OptionSetElapsedTime(true),
					progressbar.OptionThrottle(100e6),
					progressbar.OptionClearOnFinish(),
				)
				update, end = func(n int64) { _ = bar.Set64(n) }, func() { _ = bar.Finish(); _ = bar.Clear() }
			default:
				fmt.Fprintf(f, "%s...\n", stageNames[stage])
			}
		}
		if update != nil {
			update(done)
		}
	}
	return show, func() { end() }
}
