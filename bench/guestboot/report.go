package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxd-dev/boxd/runner/qemu"
	"golang.org/x/sys/unix"
)

// Report is the JSON output.
type Report struct {
	Host      Host           `json:"host"`
	Guest     Guest          `json:"guest"`
	Rows      []Row          `json:"rows"`
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

// Row is one line of the table. Times are in Unit ("s" or "ms"), sizes in
// bytes.
type Row struct {
	What       string  `json:"what"`
	Unit       string  `json:"unit"`
	Boxd       Figure  `json:"boxd"`
	Baseline   *Figure `json:"baseline,omitempty"`
	BaselineIs string  `json:"baseline_is,omitempty"`
	// Ratio is boxd's value over the baseline's (0: no baseline).
	Ratio float64 `json:"ratio,omitempty"`
}

// Figure is one side of a row: the median of its samples (or the statistic
// the row names), with their range.
type Figure struct {
	Value   float64   `json:"value"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	N       int       `json:"n"`
	Samples []float64 `json:"samples,omitempty"`
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

func (r *Report) add(row Row) { r.Rows = append(r.Rows, row) }

// durRow compares duration samples by their medians; base may be nil.
func durRow(what, unit string, boxd, base []time.Duration, baseIs string) Row {
	row := Row{What: what, Unit: unit, Boxd: durFigure(boxd, unit, true)}
	if len(base) > 0 {
		f := durFigure(base, unit, true)
		row.Baseline, row.BaselineIs = &f, baseIs
		row.Ratio = ratio(row.Boxd.Value, f.Value)
	}
	return row
}

// statRow compares one statistic of two sets of samples, in milliseconds.
func statRow(what string, stat func([]time.Duration) time.Duration, boxd, base []time.Duration, baseIs string) Row {
	fig := func(d []time.Duration) Figure {
		f := durFigure(d, "ms", false)
		f.Value = inUnit(stat(d), "ms")
		return f
	}
	b, h := fig(boxd), fig(base)
	return Row{What: what, Unit: "ms", Boxd: b, Baseline: &h, BaselineIs: baseIs, Ratio: ratio(b.Value, h.Value)}
}

// byteRow compares sizes by their medians; base may be nil.
func byteRow(what string, boxd, base []int64, baseIs string) Row {
	row := Row{What: what, Unit: "bytes", Boxd: byteFigure(boxd)}
	if len(base) > 0 {
		f := byteFigure(base)
		row.Baseline, row.BaselineIs = &f, baseIs
		row.Ratio = ratio(row.Boxd.Value, f.Value)
	}
	return row
}

func durFigure(d []time.Duration, unit string, keep bool) Figure {
	if len(d) == 0 {
		return Figure{}
	}
	f := Figure{Value: inUnit(percentile(d, 50), unit), Min: inUnit(slices.Min(d), unit), Max: inUnit(slices.Max(d), unit), N: len(d)}
	if keep {
		for _, x := range d {
			f.Samples = append(f.Samples, inUnit(x, unit))
		}
	}
	return f
}

func byteFigure(b []int64) Figure {
	s := slices.Clone(b)
	slices.Sort(s)
	f := Figure{Value: float64(s[(len(s)-1)/2]), Min: float64(s[0]), Max: float64(s[len(s)-1]), N: len(s)}
	if len(s)%2 == 0 {
		f.Value = (float64(s[len(s)/2-1]) + float64(s[len(s)/2])) / 2
	}
	for _, x := range b {
		f.Samples = append(f.Samples, float64(x))
	}
	return f
}

func inUnit(d time.Duration, unit string) float64 {
	if unit == "ms" {
		return float64(d) / float64(time.Millisecond)
	}
	return d.Seconds()
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// percentile is the nearest-rank p-th percentile (p 50 of an even count is
// the mean of the middle two).
func percentile(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	if p == 50 && len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	rank := int(math.Ceil(float64(p) / 100 * float64(len(s))))
	return s[max(rank, 1)-1]
}

func mean(d []time.Duration) time.Duration {
	var sum time.Duration
	for _, x := range d {
		sum += x
	}
	return sum / time.Duration(len(d))
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

func size(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// host describes this machine: its CPUs, the accelerator the qemu runner
// chose, QEMU's version and the kernel.
func host(accel string) Host {
	h := Host{CPUs: runtime.NumCPU(), Accel: accel, Go: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				h.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		h.QEMU = strings.TrimPrefix(string(bytes.TrimSpace(bytes.SplitN(out, []byte("\n"), 2)[0])), "QEMU emulator version ")
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		h.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	return h
}

func printTable(w io.Writer, rep Report) {
	h, g := rep.Host, rep.Guest
	accel := h.Accel
	if accel == qemu.AccelTCG {
		accel += " (no vmx/svm: every guest instruction is translated)"
	}
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, Linux %s\n", h.CPUs, h.CPUModel, accel, h.QEMU, h.Kernel)
	fmt.Fprintf(w, "guest: kernel %s, %d MiB, %d vCPU, image %s; medians of %d runs (range), exec over %d round trips\n\n",
		g.Kernel, g.MemMiB, g.CPUs, g.Image, g.Reps, g.Execs)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "what\tboxd\tbaseline\tratio\t")
	var legend []string
	for _, r := range rep.Rows {
		base, rat := "-", "-"
		if r.Baseline != nil {
			base = cell(*r.Baseline, r.Unit)
			if r.Ratio > 0 {
				rat = fmt.Sprintf("%.2fx", r.Ratio)
			}
			if !slices.Contains(legend, r.BaselineIs) {
				legend = append(legend, r.BaselineIs)
			}
			base += fmt.Sprintf(" [%d]", slices.Index(legend, r.BaselineIs)+1)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", r.What, cell(r.Boxd, r.Unit), base, rat)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nbaselines:")
	for i, l := range legend {
		fmt.Fprintf(w, "  [%d] %s\n", i+1, l)
	}
	fmt.Fprintln(w, "\nsnapshots (stored anew, per map):")
	for _, s := range rep.Snapshots {
		var parts []string
		for _, m := range []string{"memory", "devices", "disk"} {
			if n, ok := s.NewStored[m]; ok {
				parts = append(parts, fmt.Sprintf("%s %s (%d chunks)", m, size(n), s.NewChunks[m]))
			}
		}
		fmt.Fprintf(w, "  %s (parent %s): %.2f s, packs +%s: %s\n", s.Name, s.Parent, s.Seconds, size(s.PackBytesAdded), strings.Join(parts, ", "))
	}
	fmt.Fprintf(w, "\nmeasured in %.0f s\n", rep.Seconds)
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	var v func(float64) string
	switch unit {
	case "bytes":
		v = func(x float64) string { return size(int64(x)) }
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
