package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
)

// Report is the JSON output.
type Report struct {
	Machine  Machine   `json:"machine"`
	Image    ImageInfo `json:"image"`
	Results  []Result  `json:"results"`
	Goals    []Goal    `json:"goals"`
	Failures []string  `json:"failures,omitempty"`
}

// ImageInfo describes the image and its layers.
type ImageInfo struct {
	Rootfs        string `json:"rootfs"`
	Entries       int    `json:"entries"`
	FileBytes     int64  `json:"regular_file_bytes"`
	LayerBytes    int64  `json:"layer_tar_bytes"`
	LowerBytes    int64  `json:"two_layers_lower_tar_bytes"`
	UpperBytes    int64  `json:"two_layers_upper_tar_bytes"`
	UpperEntries  int    `json:"two_layers_upper_entries"`
	TopLayerBytes int64  `json:"top_layer_tar_bytes"`
	Images        int    `json:"images"`
	ImageSize     int64  `json:"image_size"`
}

// Goal is one goal and whether the run met it.
type Goal struct {
	Name   string `json:"name"`
	Met    bool   `json:"met"`
	Detail string `json:"detail"`
}

func find(results []Result, kind string) *Result {
	for i := range results {
		if results[i].Snapshotter == kind {
			return &results[i]
		}
	}
	return nil
}

func goals(results []Result) []Goal {
	space := Goal{Name: "boxd uses the least space of the four (du -sb, 5 images)"}
	boxd := find(results, kindBoxd)
	var missing []string
	for _, k := range allKinds {
		if r := find(results, k); r == nil || r.Disk == nil {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		space.Detail = "no figure for " + strings.Join(missing, ", ")
	} else {
		space.Met = true
		var parts []string
		for _, k := range allKinds {
			r := find(results, k)
			parts = append(parts, fmt.Sprintf("%s %s", k, mib(r.Disk.DuBytes)))
			if k != kindBoxd && r.Disk.DuBytes <= boxd.Disk.DuBytes {
				space.Met = false
			}
		}
		space.Detail = strings.Join(parts, ", ")
	}

	speed := Goal{Name: "boxd unpacks within 2x of blockfile (one layer)"}
	bf := find(results, kindBlockfile)
	switch {
	case boxd == nil || boxd.OneLayer == nil:
		speed.Detail = "no figure for boxd"
	case bf == nil || bf.OneLayer == nil:
		speed.Detail = "no figure for blockfile"
	default:
		ratio := boxd.OneLayer.Total / bf.OneLayer.Total
		speed.Met = ratio <= 2
		speed.Detail = fmt.Sprintf("boxd %.2fs, blockfile %.2fs: %.2fx", boxd.OneLayer.Total, bf.OneLayer.Total, ratio)
	}
	return []Goal{space, speed}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

func printTable(w io.Writer, rep Report) {
	im := rep.Image
	fmt.Fprintf(w, "\nboxd's containerd snapshotter beside containerd's native, overlayfs and blockfile (containerd %s, in-process)\n", rep.Machine.Containerd)
	fmt.Fprintf(w, "machine: %d CPUs, Linux %s, %s, work folder on %s\n", rep.Machine.CPUs, rep.Machine.Kernel, rep.Machine.Go, rep.Machine.WorkFS)
	fmt.Fprintf(w, "image: Debian bookworm minbase, %d entries, %s in regular files, layer tar %s; as two layers %s + %s (/etc, %d entries)\n",
		im.Entries, mib(im.FileBytes), mib(im.LayerBytes), mib(im.LowerBytes), mib(im.UpperBytes), im.UpperEntries)
	fmt.Fprintf(w, "%d images = the base + a top layer each (%s: a 1 MiB file of random bytes, one file of /etc changed); image size %s (boxd, blockfile)\n\n",
		im.Images, mib(im.TopLayerBytes), mib(im.ImageSize))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	var cols []string
	for _, r := range rep.Results {
		cols = append(cols, r.Snapshotter)
	}
	fmt.Fprintf(tw, "%s\t%s\t\n", "", strings.Join(cols, "\t"))
	row := func(label string, f func(r Result) string) {
		cells := make([]string, len(rep.Results))
		for i, r := range rep.Results {
			cells[i] = "-"
			if v := f(r); v != "" {
				cells[i] = v
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t\n", label, strings.Join(cells, "\t"))
	}
	secs := func(get func(r Result) (float64, bool)) func(r Result) string {
		return func(r Result) string {
			if v, ok := get(r); ok {
				return fmt.Sprintf("%.3f", v)
			}
			return ""
		}
	}
	one := func(f func(s Steps) float64) func(r Result) string {
		return secs(func(r Result) (float64, bool) {
			if r.OneLayer == nil {
				return 0, false
			}
			return f(*r.OneLayer), true
		})
	}
	row("unpack, 1 layer (s)", one(func(s Steps) float64 { return s.Total }))
	row("  prepare", one(func(s Steps) float64 { return s.Prepare }))
	row("  mount", one(func(s Steps) float64 { return s.Mount }))
	row("  apply (archive.Apply)", one(func(s Steps) float64 { return s.Apply }))
	row("  unmount", one(func(s Steps) float64 { return s.Unmount }))
	row("  commit", one(func(s Steps) float64 { return s.Commit }))
	row("  sync(2) afterwards, not counted", one(func(s Steps) float64 { return s.Sync }))
	two := func(i int) func(r Result) string {
		return secs(func(r Result) (float64, bool) {
			if len(r.TwoLayers) != 2 {
				return 0, false
			}
			if i < 0 {
				return r.TwoLayersTotal, true
			}
			return r.TwoLayers[i].Total, true
		})
	}
	row("unpack, 2 layers (s)", two(-1))
	row("  layer 1, all but /etc", two(0))
	row("  layer 2, /etc", two(1))
	row("top layer on the base, median of 5 (s)", secs(func(r Result) (float64, bool) {
		return median(r.Tops, func(s Steps) float64 { return s.Total }), len(r.Tops) > 0
	}))
	ctr := func(f func(c Container) float64, worst bool) func(r Result) string {
		return secs(func(r Result) (float64, bool) {
			if len(r.Containers) == 0 {
				return 0, false
			}
			if worst {
				m := 0.0
				for _, c := range r.Containers {
					m = max(m, f(c))
				}
				return m, true
			}
			return median(r.Containers, f), true
		})
	}
	row("container: prepare + mount, median of 5 (s)", ctr(func(c Container) float64 { return c.Total }, false))
	row("  prepare", ctr(func(c Container) float64 { return c.Prepare }, false))
	row("  mount", ctr(func(c Container) float64 { return c.Mount }, false))
	row("  slowest of 5", ctr(func(c Container) float64 { return c.Total }, true))
	disk := func(get func(r Result) *Disk, alloc bool) func(r Result) string {
		return func(r Result) string {
			d := get(r)
			if d == nil {
				return ""
			}
			if alloc {
				return mib(d.AllocatedBytes)
			}
			return mib(d.DuBytes)
		}
	}
	row("disk, 5 images (du -sb)", disk(func(r Result) *Disk { return r.Disk }, false))
	row("  allocated (du -s --block-size=1)", disk(func(r Result) *Disk { return r.Disk }, true))
	row("disk, 5 images + 5 containers (du -sb)", disk(func(r Result) *Disk { return r.DiskWithContainers }, false))
	row("  allocated (du -s --block-size=1)", disk(func(r Result) *Disk { return r.DiskWithContainers }, true))
	usage := func(i int) func(r Result) string {
		return func(r Result) string {
			if len(r.Usage) <= i {
				return ""
			}
			return mib(r.Usage[i].Bytes)
		}
	}
	row("Usage(base)", usage(0))
	row("Usage(image-1)", usage(1))
	row("container-1 checked against the rootfs (entries)", func(r Result) string {
		if r.Verified == 0 {
			return ""
		}
		return fmt.Sprint(r.Verified)
	})
	tw.Flush()

	if b := find(rep.Results, kindBoxd); b != nil && b.Boxd != nil {
		s := b.Boxd
		fmt.Fprintf(w, "\nboxd store report: stored_bytes %s (%d), unique_bytes %s, referenced_bytes %s, dedup_ratio %.2f, %d snapshots; packs %s, index %s\n",
			mib(s.StoredBytes), s.StoredBytes, mib(s.UniqueBytes), mib(s.ReferencedBytes), s.DedupRatio, s.Snapshots, mib(s.PackBytes), mib(s.IndexBytes))
		for _, p := range s.PerSnapshot {
			fmt.Fprintf(w, "  %-10s (%s): new_bytes %s, written_stored_bytes %s\n", p.Label, p.Name, mib(p.NewBytes), mib(p.WrittenStoredBytes))
		}
		names := slices.Sorted(maps.Keys(s.Files))
		var parts []string
		for _, n := range names {
			parts = append(parts, fmt.Sprintf("%s %s", n, mib(s.Files[n])))
		}
		fmt.Fprintf(w, "boxd's root: %s\n", strings.Join(parts, ", "))
	}
	fmt.Fprintln(w, "\ngoals:")
	for _, g := range rep.Goals {
		state := "NOT MET"
		if g.Met {
			state = "MET"
		}
		fmt.Fprintf(w, "  %-7s  %s: %s\n", state, g.Name, g.Detail)
	}
	if len(rep.Failures) > 0 {
		fmt.Fprintln(w, "\nfailures:")
		for _, f := range rep.Failures {
			fmt.Fprintf(w, "  %s\n", f)
		}
	}
}
