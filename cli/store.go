package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"github.com/urfave/cli/v2"
)

// storeMemoryLimit is the soft Go heap limit of the store commands.
const storeMemoryLimit = 96 << 20

func storeCommand() *cli.Command {
	return &cli.Command{
		Name:  "store",
		Usage: "the content-addressed store: ingest, export and inspect snapshots, collect garbage, verify",
		Before: func(*cli.Context) error {
			// The store streams; a soft heap limit keeps an ingest of any
			// size well under 200 MiB of RSS. GOMEMLIMIT overrides it.
			if os.Getenv("GOMEMLIMIT") == "" {
				debug.SetMemoryLimit(storeMemoryLimit)
			}
			return nil
		},
		Subcommands: append([]*cli.Command{
			{
				Name:      "ingest",
				Usage:     "store a file (a disk or memory image) as a new snapshot",
				ArgsUsage: "FILE",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "name", Usage: "name of the new snapshot ([A-Za-z0-9._-], up to 128)"},
					&cli.StringFlag{Name: "parent", Usage: "snapshot this one is a delta against"},
					&cli.StringFlag{Name: "kind", Value: "disk", Usage: "what the file holds: disk or memory"},
					jsonFlag,
				},
				Action: storeIngest,
			},
			{
				Name:      "export",
				Usage:     "write a snapshot's image to a file, byte-identical, zero runs as holes",
				ArgsUsage: "NAME OUT",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "map", Usage: "which map to export when the snapshot has several (default: its only one)"},
					jsonFlag,
				},
				Action: storeExport,
			},
			{Name: "ls", Usage: "list snapshots, parents first", Flags: []cli.Flag{jsonFlag}, Action: storeList},
			{Name: "report", Usage: "the dedup report (all snapshots, or those named)", ArgsUsage: "[NAME...]", Flags: []cli.Flag{jsonFlag}, Action: storeReport},
			{Name: "rm", Usage: "remove a snapshot that has no children (gc reclaims its chunks)", ArgsUsage: "NAME", Flags: []cli.Flag{jsonFlag}, Action: storeRemove},
			{
				Name:  "gc",
				Usage: "delete chunks no snapshot references, rewriting packs that are mostly garbage",
				Flags: []cli.Flag{
					&cli.Float64Flag{Name: "threshold", Value: 0.5, Usage: "rewrite a pack once this fraction of it is garbage (0-1]"},
					jsonFlag,
				},
				Action: storeGC,
			},
			{
				Name:   "compact",
				Usage:  "recompress the packs written since the last compaction into smaller zstd packs",
				Flags:  []cli.Flag{&cli.IntFlag{Name: "frame-chunks", Usage: "most chunks one zstd frame holds (1-255)", DefaultText: strconv.Itoa(cas.DefaultFrameChunks)}, jsonFlag},
				Action: storeCompact,
			},
			{Name: "verify", Usage: "re-hash every stored chunk and check every snapshot; exit 6 on damage", Flags: []cli.Flag{jsonFlag}, Action: storeVerify},
		}, remoteCommands()...),
	}
}

// runningDaemon returns a client of the daemon serving --root, or nil when
// none answers.
func runningDaemon(c *cli.Context) *daemon.Client {
	dc, _, err := daemonClient(c)
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(c.Context, 2*time.Second)
	defer cancel()
	if _, err := dc.Info(ctx); err != nil {
		return nil
	}
	return dc
}

// daemonOrLocal runs viaDaemon when a daemon serves --root, since it owns
// the store while it runs; otherwise it opens the graph under --root and
// runs local on it.
func daemonOrLocal[T any](c *cli.Context, viaDaemon func(*daemon.Client) (T, error), local func(*snapshotter.Graph) (T, error)) (T, error) {
	if dc := runningDaemon(c); dc != nil {
		return viaDaemon(dc)
	}
	g, err := openGraph(c)
	if err != nil {
		var zero T
		return zero, err
	}
	defer g.Close()
	return local(g)
}

// openGraph opens the graph under --root.
func openGraph(c *cli.Context) (*snapshotter.Graph, error) {
	root := c.String("root")
	if root == "" {
		return nil, usageError("--root must not be empty")
	}
	return snapshotter.Open(root)
}

// args checks the number of positional arguments.
func args(c *cli.Context, want int, usage string) error {
	if c.NArg() != want {
		return usageError("usage: boxd store %s %s (got %d arguments)", c.Command.Name, usage, c.NArg())
	}
	return nil
}

// IngestResult is what `store ingest --json` prints.
type IngestResult struct {
	Name         string  `json:"name"`
	Parent       string  `json:"parent,omitempty"`
	Kind         string  `json:"kind"`
	LogicalBytes int64   `json:"logical_bytes"`
	ZeroBytes    int64   `json:"zero_bytes"`
	NewBytes     int64   `json:"new_bytes"`
	ReusedBytes  int64   `json:"reused_bytes"`
	StoredBytes  int64   `json:"stored_bytes"`
	Seconds      float64 `json:"seconds"`
	MBPerSecond  float64 `json:"mb_per_s"`
}

func storeIngest(c *cli.Context) error {
	if err := args(c, 1, "--name NAME [--parent P] [--kind disk|memory] FILE"); err != nil {
		return err
	}
	kind, err := snapshotter.ParseKind(c.String("kind"))
	if err != nil {
		return err
	}
	name := c.String("name")
	if !c.IsSet("name") {
		return usageError("--name is required")
	}
	if err := snapshotter.ValidateName(name); err != nil {
		return err
	}
	path := c.Args().First()
	in := os.Stdin
	var total int64 = -1
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		if fi.IsDir() {
			return usageError("%s is a folder, not an image file", path)
		}
		in, total = f, fi.Size()
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	update, finish := progress(c, total, "ingest")
	start := time.Now()
	snap, err := g.Ingest(c.Context, in, snapshotter.IngestOptions{Name: name, Parent: c.String("parent"), Kind: kind, Progress: update})
	finish()
	if err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	m := snap.Maps[0]
	for _, mm := range snap.Maps {
		if mm.Name == string(kind) {
			m = mm
		}
	}
	res := IngestResult{
		Name: snap.Name, Parent: snap.Parent, Kind: string(kind),
		LogicalBytes: m.Size,
		ZeroBytes:    m.ZeroChunks * cas.ChunkSize,
		NewBytes:     m.NewChunks * cas.ChunkSize,
		ReusedBytes:  m.ReusedChunks * cas.ChunkSize,
		StoredBytes:  m.NewStored,
		Seconds:      secs,
		MBPerSecond:  float64(m.Size) / 1e6 / max(secs, 1e-9),
	}
	if wantJSON(c) {
		return printJSON(c, res)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "snapshot %s: %s %s ingested in %.2fs (%.0f MB/s)\n", snap.Name, size(res.LogicalBytes), kind, secs, res.MBPerSecond)
	table(w, [][]string{
		{"  logical", size(res.LogicalBytes)},
		{"  zero", size(res.ZeroBytes)},
		{"  new", size(res.NewBytes)},
		{"  reused", size(res.ReusedBytes)},
		{"  stored", size(res.StoredBytes)},
	})
	return nil
}

func storeExport(c *cli.Context) error {
	if err := args(c, 2, "NAME OUT"); err != nil {
		return err
	}
	name, out := c.Args().Get(0), c.Args().Get(1)
	if fi, err := os.Stat(out); err == nil && fi.IsDir() {
		return usageError("%s is a folder; give the path of the file to write", out)
	}
	if _, err := os.Stat(filepath.Dir(out)); err != nil {
		return fmt.Errorf("output folder: %w", err)
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	snap, err := g.Get(name)
	if err != nil {
		return err
	}
	mapName := c.String("map")
	if mapName == "" {
		if len(snap.Maps) != 1 {
			var names []string
			for _, m := range snap.Maps {
				names = append(names, m.Name)
			}
			return usageError("snapshot %q has %d maps (%s); choose one with --map", name, len(snap.Maps), strings.Join(names, ", "))
		}
		mapName = snap.Maps[0].Name
	}
	r, err := g.OpenMap(name, mapName)
	if err != nil {
		return err
	}
	update, finish := progress(c, r.Size(), "export")
	start := time.Now()
	err = r.Export(c.Context, out, update)
	finish()
	if err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	res := map[string]any{"name": name, "map": mapName, "out": out, "bytes": r.Size(), "seconds": secs, "mb_per_s": float64(r.Size()) / 1e6 / max(secs, 1e-9)}
	if wantJSON(c) {
		return printJSON(c, res)
	}
	fmt.Fprintf(c.App.Writer, "exported %s (%s) to %s in %.2fs (%.0f MB/s)\n", name, size(r.Size()), out, secs, res["mb_per_s"])
	return nil
}

func storeList(c *cli.Context) error {
	if err := args(c, 0, ""); err != nil {
		return err
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	all, err := g.List()
	if err != nil {
		return err
	}
	if wantJSON(c) {
		if all == nil {
			all = []snapshotter.Snapshot{}
		}
		return printJSON(c, all)
	}
	rows := [][]string{{"NAME", "PARENT", "MAPS", "SIZE", "CHANGED", "CREATED"}}
	for _, s := range all {
		var maps []string
		var changed int64
		for _, m := range s.Maps {
			maps = append(maps, m.Name+":"+string(m.Kind))
			changed += m.Changed
		}
		parent := s.Parent
		if parent == "" {
			parent = "-"
		}
		rows = append(rows, []string{s.Name, parent, strings.Join(maps, ","), size(s.Size()), size(changed * cas.ChunkSize), s.Created.Local().Format(time.DateTime)})
	}
	table(c.App.Writer, rows)
	return nil
}

func storeReport(c *cli.Context) error {
	if c.NArg() == 0 {
		if done, err := remoteReport(c); done {
			return err
		}
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	rep, err := g.Report(c.Context, c.Args().Slice()...)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		if rep.PerSnap == nil {
			rep.PerSnap = []snapshotter.SnapshotReport{}
		}
		if rep.Histogram == nil {
			rep.Histogram = []snapshotter.RefBucket{}
		}
		return printJSON(c, rep)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "%d snapshots\n", rep.Snapshots)
	table(w, [][]string{
		{"  logical", size(rep.LogicalBytes), ""},
		{"  zero", size(rep.ZeroBytes), "(never stored)"},
		{"  referenced", size(rep.ReferencedBytes), "(logical - zero)"},
		{"  unique", size(rep.UniqueBytes), fmt.Sprintf("(%d chunks)", rep.UniqueChunks)},
		{"  stored", size(rep.StoredBytes), "(compressed, in packs)"},
		{"  dedup", ratioStr(rep.DedupRatio), "(referenced / unique)"},
		{"  compression", ratioStr(rep.CompressionRatio), "(unique / stored)"},
		{"  combined", ratioStr(rep.CombinedRatio), "(referenced / stored)"},
	})
	fmt.Fprintln(w, "\nstore")
	table(w, [][]string{
		{"  packs", strconv.Itoa(rep.Store.Packs), size(rep.Store.PackBytes)},
		{"  index", fmt.Sprintf("%d entries", rep.Store.IndexEntries), size(rep.Store.IndexBytes)},
		{"  garbage", fmt.Sprintf("%d chunks", rep.Store.GarbageChunks), size(rep.Store.GarbageBytes)},
		{"  gc would free", "", size(rep.Store.ReclaimableBytes)},
	})
	if len(rep.Histogram) > 0 {
		fmt.Fprintln(w, "\nreference counts (all snapshots)")
		rows := [][]string{{"  REFS", "CHUNKS", "STORED", "REFERENCED"}}
		for _, b := range rep.Histogram {
			refs := strconv.FormatInt(b.MinRefs, 10)
			if b.MaxRefs != b.MinRefs {
				refs += "-" + strconv.FormatInt(b.MaxRefs, 10)
			}
			rows = append(rows, []string{"  " + refs, strconv.FormatInt(b.Chunks, 10), size(b.StoredBytes), size(b.ReferencedBytes)})
		}
		table(w, rows)
	}
	if len(rep.PerSnap) > 0 {
		fmt.Fprintln(w, "\nsnapshots")
		rows := [][]string{{"  NAME", "PARENT", "LOGICAL", "ZERO", "NEW", "REUSED", "WRITTEN", "EXCLUSIVE"}}
		for _, s := range rep.PerSnap {
			parent := s.Parent
			if parent == "" {
				parent = "-"
			}
			rows = append(rows, []string{"  " + s.Name, parent, size(s.LogicalBytes), size(s.ZeroBytes), size(s.NewBytes), size(s.ReusedBytes), size(s.WrittenStoredBytes), size(s.ExclusiveBytes)})
		}
		table(w, rows)
	}
	return nil
}

func ratioStr(r float64) string {
	if r == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", r)
}

func storeRemove(c *cli.Context) error {
	if err := args(c, 1, "NAME"); err != nil {
		return err
	}
	if err := snapshotter.ValidateName(c.Args().First()); err != nil {
		return err
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	name := c.Args().First()
	if err := g.Remove(name); err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, map[string]any{"removed": name})
	}
	fmt.Fprintf(c.App.Writer, "removed snapshot %s; run `boxd store gc` to reclaim its chunks\n", name)
	return nil
}

func storeGC(c *cli.Context) error {
	if err := args(c, 0, ""); err != nil {
		return err
	}
	th := c.Float64("threshold")
	if th <= 0 || th > 1 {
		return usageError("--threshold %g is outside (0, 1]", th)
	}
	st, err := daemonOrLocal(c,
		func(dc *daemon.Client) (cas.GCStats, error) { return dc.GC(c.Context, th) },
		func(g *snapshotter.Graph) (cas.GCStats, error) {
			return g.GC(c.Context, cas.GCOptions{Threshold: th})
		})
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, st)
	}
	fmt.Fprintf(c.App.Writer, "gc: freed %s; %d packs deleted, %d rewritten (%d chunks moved, %d deleted); %d packs, %s now; %s of garbage left in packs under the threshold\n",
		size(st.BytesFreed), st.PacksDeleted, st.PacksRewritten, st.ChunksMoved, st.ChunksDeleted, st.PacksAfter, size(st.BytesAfter), size(st.GarbageRemaining))
	return nil
}

func storeCompact(c *cli.Context) error {
	if err := args(c, 0, ""); err != nil {
		return err
	}
	fc := c.Int("frame-chunks")
	if fc < 0 || fc > cas.MaxFrameChunks {
		return usageError("--frame-chunks %d is outside 1-%d", fc, cas.MaxFrameChunks)
	}
	st, err := daemonOrLocal(c,
		func(dc *daemon.Client) (cas.CompactStats, error) {
			return dc.Compact(c.Context, daemon.CompactRequest{FrameChunks: fc})
		},
		func(g *snapshotter.Graph) (cas.CompactStats, error) {
			return g.Compact(c.Context, cas.CompactOptions{FrameChunks: fc})
		})
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, st)
	}
	fmt.Fprintf(c.App.Writer, "compact: %d packs (%s) rewritten as %d (%s) in %.2fs; %d chunks in %d frames\n",
		st.PacksCompacted, size(st.BytesBefore), st.PacksWritten, size(st.BytesAfter), st.Seconds, st.ChunksMoved, st.Frames)
	if st.ChunksKept > 0 {
		fmt.Fprintf(c.App.Writer, "  %d chunks of working sets left out of frames (a lazy resume reads them first)\n", st.ChunksKept)
	}
	for _, s := range st.Skipped {
		fmt.Fprintf(c.App.Writer, "  left as it is: %s\n", s)
	}
	return nil
}

func storeVerify(c *cli.Context) error {
	if err := args(c, 0, ""); err != nil {
		return err
	}
	g, err := openGraph(c)
	if err != nil {
		return err
	}
	defer g.Close()
	update, finish := progress(c, 0, "verify")
	res, err := g.Verify(c.Context, func(done, total int64) {
		if update != nil {
			update(done)
		}
	})
	finish()
	if err != nil {
		return err
	}
	if res.Damaged == nil {
		res.Damaged = []cas.Damage{}
	}
	if res.Problems == nil {
		res.Problems = []snapshotter.Problem{}
	}
	if wantJSON(c) {
		if err := printJSON(c, res); err != nil {
			return err
		}
	} else {
		w := c.App.Writer
		fmt.Fprintf(w, "checked %d packs, %d chunks (%s), %d snapshots\n", res.Packs, res.Chunks, size(res.Bytes), res.Snapshots)
		for _, d := range res.Damaged {
			fmt.Fprintf(w, "damaged: %s\n", d)
		}
		for _, p := range res.Problems {
			fmt.Fprintf(w, "snapshot %s map %s: %s %s\n", p.Snapshot, p.Map, p.Reason, p.Chunk)
		}
	}
	if !res.OK() {
		return fmt.Errorf("verify found %d damaged chunks or packs and %d snapshot problems: %w", len(res.Damaged), len(res.Problems), errdefs.ErrDataLoss)
	}
	return nil
}
