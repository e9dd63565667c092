package main

import (
	"fmt"
	"io"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// Report is the JSON output.
type Report struct {
	Host      Host           `json:"host"`
	Guest     Guest          `json:"guest"`
	Rows      []benchkit.Row `json:"rows"`
	Snapshots []SnapshotInfo `json:"snapshots"`
	Seconds   float64        `json:"measure_seconds"` // the measurements, set-up left out
}

// Host says where the run happened.
type Host struct {
	CPUs     int    `json:"cpus"`
	CPUModel string `json:"cpu_model"`
	Accel    string `json:"accel"`
	QEMU     string `json:"qemu"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
}

// Guest says what was booted.
type Guest struct {
	Kernel string `json:"kernel"`
	Image  string `json:"image"`
	MemMiB int64  `json:"mem_mib"`
	CPUs   int    `json:"cpus"`
	Reps   int    `json:"reps"`
	Execs  int    `json:"execs"`
}

// SnapshotInfo is what one snapshot stored.
type SnapshotInfo struct {
	Name           string  `json:"name"`
	Parent         string  `json:"parent"`
	Seconds        float64 `json:"seconds"`
	PackBytesAdded int64   `json:"pack_bytes_added"`
	// FrozenFile: a freeze that left its memory file for restores to map.
	FrozenFile bool `json:"frozen_memory_file,omitempty"`
	// NewStored and NewChunks are per map (memory, devices, disk): the
	// stored bytes and chunks it added, as the snapshot recorded them.
	NewStored map[string]int64 `json:"new_stored_bytes"`
	NewChunks map[string]int64 `json:"new_chunks"`
}

func (r *Report) add(row benchkit.Row) { r.Rows = append(r.Rows, row) }

// statRow compares one statistic of two sets of samples, in milliseconds.
func statRow(what string, stat func([]time.Duration) time.Duration, boxd, base []time.Duration, baseIs string) benchkit.Row {
	fig := func(d []time.Duration) benchkit.Figure {
		f := benchkit.DurFigure(d, 50, "ms")
		f.Value, f.Samples = benchkit.InUnit(stat(d), "ms"), nil
		return f
	}
	return benchkit.Row{What: what, Unit: "ms", Boxd: fig(boxd)}.Beside(fig(base), baseIs)
}

// byteRow compares sizes by their medians; base may be nil.
func byteRow(what string, boxd, base []int64, baseIs string) benchkit.Row {
	row := benchkit.Row{What: what, Unit: "bytes", Boxd: byteFigure(boxd)}
	if len(base) > 0 {
		row = row.Beside(byteFigure(base), baseIs)
	}
	return row
}

func byteFigure(b []int64) benchkit.Figure {
	s := slices.Clone(b)
	slices.Sort(s)
	f := benchkit.Figure{Value: float64(s[(len(s)-1)/2]), Min: float64(s[0]), Max: float64(s[len(s)-1]), N: len(s)}
	if len(s)%2 == 0 {
		f.Value = (float64(s[len(s)/2-1]) + float64(s[len(s)/2])) / 2
	}
	for _, x := range b {
		f.Samples = append(f.Samples, float64(x))
	}
	return f
}

func mean(d []time.Duration) time.Duration {
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	return sum / time.Duration(len(d))
}

// host describes this machine: its CPUs, the accelerator the qemu runner
// chose, QEMU's version and the kernel.
func host(accel string) Host {
	model, _ := benchkit.CPU()
	return Host{CPUs: runtime.NumCPU(), CPUModel: model, Accel: accel, QEMU: benchkit.QEMUVersion(), Kernel: benchkit.KernelRelease(), Go: runtime.Version()}
}

func printTable(w io.Writer, rep Report) {
	h, g := rep.Host, rep.Guest
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, Linux %s\n", h.CPUs, h.CPUModel, benchkit.DescribeAccel(h.Accel), h.QEMU, h.Kernel)
	fmt.Fprintf(w, "guest: kernel %s, %d MiB, %d vCPU, image %s; medians of %d runs (range), exec over %d round trips\n\n",
		g.Kernel, g.MemMiB, g.CPUs, g.Image, g.Reps, g.Execs)

	benchkit.PrintRows(w, rep.Rows, cell)
	fmt.Fprintln(w, "\nsnapshots (stored anew, per map):")
	for _, s := range rep.Snapshots {
		var parts []string
		for _, m := range []string{"memory", "devices", "disk"} {
			if n, ok := s.NewStored[m]; ok {
				parts = append(parts, fmt.Sprintf("%s %s (%d chunks)", m, benchkit.Size(n), s.NewChunks[m]))
			}
		}
		fmt.Fprintf(w, "  %s (parent %s): %.2f s, packs +%s: %s\n", s.Name, s.Parent, s.Seconds, benchkit.Size(s.PackBytesAdded), strings.Join(parts, ", "))
	}
	fmt.Fprintf(w, "\nmeasured in %.0f s\n", rep.Seconds)
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f benchkit.Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	var v func(float64) string
	switch unit {
	case "bytes":
		v = func(x float64) string { return benchkit.Size(int64(x)) }
	case "ms":
		v = func(x float64) string { return fmt.Sprintf("%.2f ms", x) }
	default:
		v = func(x float64) string { return fmt.Sprintf("%.3f s", x) }
	}
	s := v(f.Value)
	if f.N > 1 && len(f.Samples) > 0 {
		s += fmt.Sprintf(" (%s-%s)", strings.TrimSuffix(v(f.Min), " "+unitOf(unit)), v(f.Max))
	}
	return s
}

func unitOf(unit string) string {
	if unit == "ms" || unit == "s" {
		return unit
	}
	return ""
}
