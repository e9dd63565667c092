package main

import (
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// Report is the JSON output.
type Report struct {
	Host    Host        `json:"host"`
	Setup   Setup       `json:"setup"`
	Rows    []Row       `json:"rows"`
	Samples []Sample    `json:"samples"` // every resume, warm-ups included
	Memory  []MemSample `json:"memory"`
	// Failures are the timed resumes and wakes that failed (the run went
	// on without them); LogTrouble the daemon's WARN and ERROR lines.
	Failures   []string         `json:"failures"`
	LogTrouble []string         `json:"log_trouble"`
	Cleanup    benchkit.Cleanup `json:"cleanup"`
	Seconds    float64          `json:"measure_seconds"` // the phases, set-up and clean-up left out
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

// Setup is what was asked for.
type Setup struct {
	Memory        string `json:"memory"`
	FillMiB       int    `json:"fill_mib"`
	BigMemory     string `json:"big_memory"`
	TouchBigMiB   int    `json:"touch_big_mib"`
	TouchSmallMiB int    `json:"touch_small_mib"`
	Rounds        int    `json:"rounds"`
	Reps          int    `json:"reps"`
	Idle          string `json:"idle"`
	WarmUps       int    `json:"warm_ups"`
	Compact       bool   `json:"compact"`                // the store compacted before the timed resumes
	FrameChunks   int    `json:"frame_chunks,omitempty"` // the compaction's --frame-chunks (0: its default)
	UploadMiB     int    `json:"upload_mib"`             // streamed into dev across its busy resumes (0: none)
	Daemon        string `json:"daemon"`
}

// Sample is one resume: the phase ("lazy 2"), the box, what resumed it
// ("resume" or "ssh-wake"), its wall time, the log's total and, lazy, the
// done line's took; and the log's restore line.
type Sample struct {
	Phase   string  `json:"phase"`
	Box     string  `json:"box"`
	Op      string  `json:"op"`
	E2EMs   float64 `json:"e2e_ms"`
	VCPUMs  float64 `json:"vcpus_running_ms"`
	TookMs  float64 `json:"memory_in_place_ms,omitempty"`
	Restore string  `json:"restore_line"`
}

// MemSample is one box's host memory after -idle.
type MemSample struct {
	Phase string `json:"phase"`
	Box   string `json:"box"`
	hostMem
	TotalBytes int64 `json:"total_bytes"` // Pss - PssShmem + FileAlloc
}

// Row is one line of the table: a statistic of the lazy phases' samples
// beside the eager phases', and the goal the lazy side is held to.
type Row struct {
	What  string          `json:"what"`
	Unit  string          `json:"unit"` // "ms", "bytes" or "x" (a ratio)
	Lazy  benchkit.Figure `json:"lazy"`
	Eager benchkit.Figure `json:"eager"`
	// Ratio is lazy's value over eager's (0: no eager figure).
	Ratio float64 `json:"ratio,omitempty"`
	Goal  string  `json:"goal,omitempty"`
	Met   string  `json:"goal_met,omitempty"` // "yes" or "no"
}

// goal is a bound on a row: on the lazy value (ofRatio false) or on the
// ratio lazy over eager.
type goal struct {
	text    string
	max     float64
	ofRatio bool
}

// row makes a row of lazy and eager figures, held to g when g.text is set.
func row(what, unit string, lazy, eager benchkit.Figure, g goal) Row {
	r := Row{What: what, Unit: unit, Lazy: lazy, Eager: eager, Goal: g.text}
	if lazy.N > 0 && eager.N > 0 {
		r.Ratio = benchkit.Ratio(lazy.Value, eager.Value)
	}
	if g.text == "" || lazy.N == 0 {
		return r
	}
	v := lazy.Value
	if g.ofRatio {
		if eager.N == 0 {
			return r
		}
		v = r.Ratio
	}
	r.Met = "no"
	if v <= g.max {
		r.Met = "yes"
	}
	return r
}

// rows is the table of both sides' figures.
func rows(s sides) []Row {
	l, e := s[0], s[1]
	dur := func(d []time.Duration) benchkit.Figure { return benchkit.DurFigure(d, 50, "ms") }
	mem := func(hs []hostMem, f func(hostMem) int64) benchkit.Figure {
		var xs []float64
		for _, h := range hs {
			xs = append(xs, float64(f(h)))
		}
		return floatFigure(xs)
	}
	none := goal{}
	rs := []Row{
		row(fmt.Sprintf("dev (%s): resume to vCPUs running (log total=): p50", *memory), "ms", dur(l.devVCPU), dur(e.devVCPU), goal{"lazy <= 40 ms", 40, false}),
		row("  of it QEMU's start (launch=): p50", "ms", dur(l.devPhases["launch"]), dur(e.devPhases["launch"]), none),
		row("  of it the wait for the memory file (filled=): p50", "ms", dur(l.devPhases["filled"]), dur(e.devPhases["filled"]), none),
		row("  of it the device state's load (devices=): p50", "ms", dur(l.devPhases["devices"]), dur(e.devPhases["devices"]), none),
		row("dev: `boxd resume dev`, until the agent answers: p50", "ms", dur(l.devAgent), dur(e.devAgent), goal{"lazy <= 150 ms", 150, false}),
		row(fmt.Sprintf("dev: `boxd resume dev`, hibernated while %d MiB streamed into it: p50", *uploadMiB), "ms", dur(l.busyAgent), dur(e.busyAgent), none),
		row("  busy over idle, to the agent (each pair's ratio): p50", "x", pairRatios(l.busyAgent, l.devAgent), pairRatios(e.busyAgent, e.devAgent), none),
		row("dev: `ssh dev true`, hibernated (wakes it): p50", "ms", dur(l.wakeSSH), dur(e.wakeSSH), goal{"lazy <= 300 ms", 300, false}),
		row("dev: that wake's resume to vCPUs running: p50", "ms", dur(l.wakeVCPU), dur(e.wakeVCPU), none),
		row("dev: `ssh dev true`, running (baseline): p50", "ms", dur(l.runningSSH), dur(e.runningSSH), none),
		row("dev: `ssh dev true` at once after `boxd resume dev`: p50", "ms", dur(l.soonSSH), dur(e.soonSSH), none),
		row(fmt.Sprintf("big (%s, %d MiB touched): resume to vCPUs: p50", *bigMem, *touchBig), "ms", dur(l.bigVCPU), dur(e.bigVCPU), none),
		row(fmt.Sprintf("little (%s, %d MiB touched): resume to vCPUs: p50", *bigMem, *touchLow), "ms", dur(l.litVCPU), dur(e.litVCPU), none),
		row("big over little, to vCPUs (each pair's ratio): p50", "x", pairRatios(l.bigVCPU, l.litVCPU), pairRatios(e.bigVCPU, e.litVCPU), goal{"lazy <= 1.2x", 1.2, false}),
		row("big: `boxd resume big`, to the agent: p50", "ms", dur(l.bigAgent), dur(e.bigAgent), none),
		row("little: `boxd resume little`, to the agent: p50", "ms", dur(l.litAgent), dur(e.litAgent), none),
		row("big over little, to the agent (each pair's ratio): p50", "x", pairRatios(l.bigAgent, l.litAgent), pairRatios(e.bigAgent, e.litAgent), goal{"lazy <= 1.2x", 1.2, false}),
		row("dev: lazy restore's memory all in place (took=): p50", "ms", dur(append(slices.Clone(l.devTook), l.wakeTook...)), benchkit.Figure{}, none),
		row("big: lazy restore's memory all in place (took=): p50", "ms", dur(l.bigTook), benchkit.Figure{}, none),
		row("little: lazy restore's memory all in place (took=): p50", "ms", dur(l.litTook), benchkit.Figure{}, none),
		row(fmt.Sprintf("dev %s after resume: QEMU's PSS", *idle), "bytes", mem(l.devMem, func(h hostMem) int64 { return h.Pss }), mem(e.devMem, func(h hostMem) int64 { return h.Pss }), none),
		row("  of it shared memory (the memory file's mapped pages)", "bytes", mem(l.devMem, func(h hostMem) int64 { return h.PssShmem }), mem(e.devMem, func(h hostMem) int64 { return h.PssShmem }), none),
		row("  the memory file's allocation on /dev/shm", "bytes", mem(l.devMem, func(h hostMem) int64 { return h.FileAlloc }), mem(e.devMem, func(h hostMem) int64 { return h.FileAlloc }), none),
		row("  host memory: PSS - shared + file", "bytes", mem(l.devMem, hostMem.Total), mem(e.devMem, hostMem.Total), goal{"lazy <= 0.5x eager", 0.5, true}),
		row(fmt.Sprintf("big %s after resume: host memory", *idle), "bytes", mem(l.bigMem, hostMem.Total), mem(e.bigMem, hostMem.Total), none),
		row(fmt.Sprintf("little %s after resume: host memory", *idle), "bytes", mem(l.litMem, hostMem.Total), mem(e.litMem, hostMem.Total), none),
	}
	return rs
}

// floatFigure is the median of xs, their range and xs.
func floatFigure(xs []float64) benchkit.Figure {
	if len(xs) == 0 {
		return benchkit.Figure{}
	}
	s := slices.Sorted(slices.Values(xs))
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return benchkit.Figure{Value: med, Min: s[0], Max: s[len(s)-1], N: len(s), Samples: xs}
}

// pairRatios is the figure of a[i] over b[i], each pair measured one
// after the other.
func pairRatios(a, b []time.Duration) benchkit.Figure {
	var xs []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			xs = append(xs, float64(a[i])/float64(b[i]))
		}
	}
	return floatFigure(xs)
}

// host describes this machine.
func host() Host {
	load := benchkit.LoadAvg() // first, before this runs anything
	model, virt := benchkit.CPU()
	h := Host{CPUs: runtime.NumCPU(), CPUModel: model, Accel: "tcg", QEMU: benchkit.QEMUVersion(), Kernel: benchkit.KernelRelease(), Go: runtime.Version(), LoadBefore: load}
	if virt {
		h.Accel = "kvm"
	}
	if out, err := exec.Command("ssh", "-V").CombinedOutput(); err == nil {
		h.OpenSSH, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	}
	return h
}

func printTable(w io.Writer, rep Report) {
	h, s := rep.Host, rep.Setup
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, %s, Linux %s; load average %s before, %s after\n",
		h.CPUs, h.CPUModel, benchkit.DescribeAccel(h.Accel), h.QEMU, h.OpenSSH, h.Kernel, h.LoadBefore, h.LoadAfter)
	fmt.Fprintf(w, "boxes: dev %s (%d MiB written and read back), big and little %s (%d and %d MiB of random data in a tmpfs), 1 vCPU, the default image;\n"+
		"%d rounds of a lazy then an eager phase, each a fresh daemon (%s), %d timed resumes of each kind a phase, host memory after %s idle\n\n",
		s.Memory, s.FillMiB, s.BigMemory, s.TouchBigMiB, s.TouchSmallMiB, s.Rounds, s.Daemon, s.Reps, s.Idle)
	if s.WarmUps > 1 {
		fmt.Fprintf(w, "each box resumed and hibernated %d times (untimed) before the timed resumes of each phase\n", s.WarmUps)
	}
	if s.Compact {
		fc := "the default"
		if s.FrameChunks > 0 {
			fc = fmt.Sprint(s.FrameChunks)
		}
		fmt.Fprintf(w, "the store compacted (boxd store compact, %s chunks a frame) before each phase's timed resumes: their memory comes from zstd frames\n\n", fc)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "what\tlazy\teager\tlazy/eager\tgoal\tmet\t")
	for _, r := range rep.Rows {
		rat := "-"
		if r.Ratio > 0 {
			rat = fmt.Sprintf("%.2fx", r.Ratio)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t\n", r.What, cell(r.Lazy, r.Unit), cell(r.Eager, r.Unit), rat, dash(r.Goal), dash(r.Met))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nfailed resumes (left out of the figures): %d\n", len(rep.Failures))
	for _, f := range rep.Failures {
		fmt.Fprintf(w, "  %s\n", f)
	}
	fmt.Fprintf(w, "the daemons' WARN and ERROR lines: %d\n", len(rep.LogTrouble))
	for _, l := range rep.LogTrouble[:min(10, len(rep.LogTrouble))] {
		fmt.Fprintf(w, "  %s\n", l)
	}
	c := rep.Cleanup
	left := "none"
	if len(c.ProcessesLeft) > 0 {
		left = strings.Join(c.ProcessesLeft, "; ")
	}
	fmt.Fprintf(w, "clean-up: %d boxes removed at the end; boxd kept %d snapshots and %d disk overlay files of removed boxes (dropped, gc freed %s); QEMUs or daemons of the root left after the daemon stopped (pgrep): %s\n",
		c.BoxesRemoved, c.SnapshotsRemoved, c.DisksRemoved, benchkit.Size(c.GCFreedBytes), left)
	fmt.Fprintf(w, "measured in %.0f s\n", rep.Seconds)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f benchkit.Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	v := func(x float64) string { return fmt.Sprintf("%.1f", x) }
	suffix := " " + unit
	switch unit {
	case "bytes":
		v = func(x float64) string { return fmt.Sprintf("%.0f", x/(1<<20)) }
		suffix = " MiB"
	case "x":
		v = func(x float64) string { return fmt.Sprintf("%.2f", x) }
		suffix = "x"
	}
	out := v(f.Value) + suffix
	if f.N > 1 {
		out += fmt.Sprintf(" (%s-%s)", v(f.Min), v(f.Max))
	}
	return out
}
