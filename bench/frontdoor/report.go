package main

import (
	"bufio"
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
)

// Report is the JSON output.
type Report struct {
	Host    Host    `json:"host"`
	Setup   Setup   `json:"setup"`
	Kex     Kex     `json:"kex"`
	Rows    []Row   `json:"rows"`
	Many    string  `json:"many_boxes"` // how the boxes for the big ls were made
	Cleanup Cleanup `json:"cleanup"`
	Seconds float64 `json:"measure_seconds"` // the measurements, set-up and clean-up left out
}

// Host says where the run happened.
type Host struct {
	CPUs       int    `json:"cpus"`
	CPUModel   string `json:"cpu_model"`
	Accel      string `json:"accel"` // what boxd's QEMU runner picks: kvm with vmx/svm, else tcg
	QEMU       string `json:"qemu"`
	OpenSSH    string `json:"openssh"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}

// Kex is the key exchange the OpenSSH client agreed on with each server.
type Kex struct {
	Boxd string `json:"boxd"`
	SSHD string `json:"sshd"`
}

// Setup is what was asked for.
type Setup struct {
	Memory     string `json:"memory"`
	ManyMemory string `json:"many_memory"`
	Reps       int    `json:"reps"`
	WakeReps   int    `json:"wake_reps"`
	ForkReps   int    `json:"fork_reps"`
	LsReps     int    `json:"ls_reps"`
	Boxes      int    `json:"boxes"`
	Batch      int    `json:"batch"`
}

// Row is one line of the table: a statistic (the row says which) of
// boxd's samples and of the baseline's, in Unit ("ms" or "s").
type Row struct {
	What       string  `json:"what"`
	Unit       string  `json:"unit"`
	Boxd       Figure  `json:"boxd"`
	Baseline   *Figure `json:"baseline,omitempty"`
	BaselineIs string  `json:"baseline_is,omitempty"`
	// Ratio is boxd's value over the baseline's (0: no baseline).
	Ratio float64 `json:"ratio,omitempty"`
}

// Figure is one side of a row: the statistic, the samples' range and the
// samples.
type Figure struct {
	Value   float64   `json:"value"`
	Min     float64   `json:"min"`
	Max     float64   `json:"max"`
	N       int       `json:"n"`
	Samples []float64 `json:"samples,omitempty"`
}

func (r *Report) add(row Row) { r.Rows = append(r.Rows, row) }

// pctRow compares the p-th percentiles of two sets of samples; base may be
// nil.
func pctRow(what string, p int, unit string, boxd, base []time.Duration, baseIs string) Row {
	row := Row{What: what, Unit: unit, Boxd: figure(boxd, p, unit)}
	if len(base) > 0 {
		f := figure(base, p, unit)
		row.Baseline, row.BaselineIs = &f, baseIs
		if f.Value > 0 {
			row.Ratio = row.Boxd.Value / f.Value
		}
	}
	return row
}

func figure(d []time.Duration, p int, unit string) Figure {
	if len(d) == 0 {
		return Figure{}
	}
	f := Figure{Value: inUnit(percentile(d, p), unit), Min: inUnit(slices.Min(d), unit), Max: inUnit(slices.Max(d), unit), N: len(d)}
	for _, x := range d {
		f.Samples = append(f.Samples, inUnit(x, unit))
	}
	return f
}

func inUnit(d time.Duration, unit string) float64 {
	if unit == "ms" {
		return float64(d) / float64(time.Millisecond)
	}
	return d.Seconds()
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

func ms(d time.Duration) string   { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

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

// host describes this machine.
func host() Host {
	h := Host{CPUs: runtime.NumCPU(), Accel: "tcg", Go: runtime.Version(), LoadBefore: loadAvg()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			switch {
			case !ok:
			case k == "model name" && h.CPUModel == "":
				h.CPUModel = v
			case k == "flags" && (slices.Contains(strings.Fields(v), "vmx") || slices.Contains(strings.Fields(v), "svm")):
				h.Accel = "kvm"
			}
		}
		f.Close()
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		h.QEMU = strings.TrimPrefix(firstLine(string(out)), "QEMU emulator version ")
	}
	if out, err := exec.Command("ssh", "-V").CombinedOutput(); err == nil {
		h.OpenSSH = firstLine(string(out))
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		h.Kernel = strings.TrimSpace(string(data))
	}
	return h
}

// loadAvg is the first three fields of /proc/loadavg.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	return strings.Join(f[:min(3, len(f))], " ")
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}

func printTable(w io.Writer, rep Report) {
	h, s := rep.Host, rep.Setup
	accel := h.Accel
	if accel == "tcg" {
		accel += " (no vmx/svm: every guest instruction is translated)"
	}
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, %s, Linux %s; load average %s before, %s after\n",
		h.CPUs, h.CPUModel, accel, h.QEMU, h.OpenSSH, h.Kernel, h.LoadBefore, h.LoadAfter)
	fmt.Fprintf(w, "box: %s, 1 vCPU, the default image; ssh: a fresh connection each time, BatchMode, an ed25519 key;\n"+
		"%d ssh round trips (after %d untimed), %d wakes, %d forks of each kind, %d runs of each ls\n\n",
		s.Memory, s.Reps, warmUps, s.WakeReps, s.ForkReps, s.LsReps)

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
	fmt.Fprintf(w, "\nthe boxes for the big ls: %s\n", rep.Many)
	c := rep.Cleanup
	left := "none"
	if len(c.ProcessesLeft) > 0 {
		left = strings.Join(c.ProcessesLeft, "; ")
	}
	fmt.Fprintf(w, "clean-up: %d boxes removed at the end; boxd kept %d snapshots and %d disk overlay files of removed boxes (dropped, gc freed %s); QEMUs or daemons of the root left after the daemon stopped (pgrep): %s\n",
		c.BoxesRemoved, c.SnapshotsRemoved, c.DisksRemoved, size(c.GCFreedBytes), left)
	fmt.Fprintf(w, "measured in %.0f s\n", rep.Seconds)
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	v := func(x float64) string { return fmt.Sprintf("%.1f", x) }
	if unit == "s" {
		v = func(x float64) string { return fmt.Sprintf("%.2f", x) }
	}
	out := v(f.Value) + " " + unit
	if f.N > 1 {
		out += fmt.Sprintf(" (%s-%s)", v(f.Min), v(f.Max))
	}
	return out
}
