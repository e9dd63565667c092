package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
)

// Report is the JSON output.
type Report struct {
	Host        Host             `json:"host"`
	Setup       Setup            `json:"setup"`
	Rows        []benchkit.Row   `json:"rows"` // boxd: with metrics (B); baseline: without (A)
	Comparisons []Comparison     `json:"comparisons"`
	Phases      []Phase          `json:"phases"`
	Scrapes     Scrapes          `json:"scrapes"`
	Cleanup     benchkit.Cleanup `json:"cleanup"`
	Seconds     float64          `json:"measure_seconds"` // the phases, set-up and clean-up left out
}

// Host says where the run happened.
type Host struct {
	CPUs       int    `json:"cpus"`
	CPUModel   string `json:"cpu_model"`
	Accel      string `json:"accel"` // what boxd's QEMU runner picks: kvm with vmx/svm, else tcg
	QEMU       string `json:"qemu"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	LoadBefore string `json:"loadavg_before"`
	LoadAfter  string `json:"loadavg_after"`
}

// Setup is what was asked for.
type Setup struct {
	Memory      string  `json:"memory"`
	Runner      string  `json:"runner"`
	Rounds      int     `json:"rounds"`
	Reps        int     `json:"reps"`     // timed forks and resumes in each phase
	WarmUps     int     `json:"warm_ups"` // untimed ones before them
	ScrapeEvery string  `json:"scrape_every"`
	BoundPct    float64 `json:"bound_pct"`
}

// Comparison is one operation with metrics (B) against without (A).
type Comparison struct {
	Operation   string  `json:"operation"`
	NWithout    int     `json:"n_without"`
	NWith       int     `json:"n_with"`
	P50DiffPct  float64 `json:"p50_diff_pct"` // (B's p50 / A's p50 - 1) × 100
	P90DiffPct  float64 `json:"p90_diff_pct"`
	P50DiffLow  float64 `json:"p50_diff_pct_low"` // the 90% interval of P50DiffPct (interval)
	P50DiffHigh float64 `json:"p50_diff_pct_high"`
	// RoundDiffPct is each round's difference of the two phases' p50s.
	RoundDiffPct []float64 `json:"round_p50_diff_pct"`
	// Verdict is "within" (the interval's top is at most the bound),
	// "above" (its bottom is above it) or "cannot tell" (it spans the
	// bound, or a single round gives no phase-to-phase spread); Why says
	// which.
	Verdict string `json:"verdict"`
	Why     string `json:"verdict_why"`
}

// Phase is one daemon's figures.
type Phase struct {
	Name        string    `json:"name"` // A1, B1, A2, ...
	Round       int       `json:"round"`
	Metrics     bool      `json:"metrics"`
	ForkMs      []float64 `json:"fork_ms"`
	ResumeMs    []float64 `json:"resume_ms"`
	ForkP50Ms   float64   `json:"fork_p50_ms"`
	ResumeP50Ms float64   `json:"resume_p50_ms"`
	Scrapes     int       `json:"scrapes,omitempty"`
}

// p50 is the phase's p50 of op (fork or resume), in ms.
func (p Phase) p50(op string) float64 {
	if op == "resume" {
		return p.ResumeP50Ms
	}
	return p.ForkP50Ms
}

// Scrapes sums up the scrapes of every B phase (all answered 200 with
// boxd_boxes, or the run failed).
type Scrapes struct {
	N     int     `json:"n"`
	P50Ms float64 `json:"p50_ms"`
	P90Ms float64 `json:"p90_ms"`
	MaxMs float64 `json:"max_ms"`
}

// resamples is the bootstrap's number of resamples.
const resamples = 2000

// baseWithout is what the rows compare with.
const baseWithout = "the same operation under a daemon started without --metrics-listen (phase A), in the same run"

// fill sets the rows, comparisons, phases and scrapes from the phases.
func (r *Report) fill(phases []phase) {
	ops := []struct {
		name string
		of   func(phase) []time.Duration
	}{
		{"fork", func(p phase) []time.Duration { return p.fork }},
		{"resume", func(p phase) []time.Duration { return p.resume }},
	}
	rng := rand.New(rand.NewPCG(1, 2)) // the same interval for the same samples
	for _, op := range ops {
		var a, b [][]time.Duration
		for _, p := range phases {
			if p.metrics {
				b = append(b, op.of(p))
			} else {
				a = append(a, op.of(p))
			}
		}
		all, base := slices.Concat(b...), slices.Concat(a...)
		what := opWhat(op.name)
		for _, pc := range []int{50, 90} {
			r.Rows = append(r.Rows, benchkit.PctRow(fmt.Sprintf("%s, /metrics scraped every %s: p%d", what, *every, pc), pc, "ms", all, base, baseWithout))
		}
		c := Comparison{
			Operation: op.name, NWithout: len(base), NWith: len(all),
			P50DiffPct: diffPct(benchkit.Percentile(all, 50), benchkit.Percentile(base, 50)),
			P90DiffPct: diffPct(benchkit.Percentile(all, 90), benchkit.Percentile(base, 90)),
		}
		c.P50DiffLow, c.P50DiffHigh = interval(a, b, rng)
		for i := range min(len(a), len(b)) {
			c.RoundDiffPct = append(c.RoundDiffPct, diffPct(benchkit.Percentile(b[i], 50), benchkit.Percentile(a[i], 50)))
		}
		c.Verdict, c.Why = judge(c, len(a), *bound)
		r.Comparisons = append(r.Comparisons, c)
	}
	var scrapes []time.Duration
	for _, p := range phases {
		r.Phases = append(r.Phases, Phase{
			Name: p.name(), Round: p.round, Metrics: p.metrics,
			ForkMs: ms(p.fork), ResumeMs: ms(p.resume),
			ForkP50Ms:   benchkit.InUnit(benchkit.Percentile(p.fork, 50), "ms"),
			ResumeP50Ms: benchkit.InUnit(benchkit.Percentile(p.resume, 50), "ms"),
			Scrapes:     len(p.scrapes),
		})
		scrapes = append(scrapes, p.scrapes...)
	}
	if len(scrapes) > 0 {
		r.Scrapes = Scrapes{
			N:     len(scrapes),
			P50Ms: benchkit.InUnit(benchkit.Percentile(scrapes, 50), "ms"),
			P90Ms: benchkit.InUnit(benchkit.Percentile(scrapes, 90), "ms"),
			MaxMs: benchkit.InUnit(slices.Max(scrapes), "ms"),
		}
	}
}

func opWhat(op string) string {
	if op == "fork" {
		return fmt.Sprintf("boxd fork %s %s (running)", box, kid)
	}
	return fmt.Sprintf("boxd resume %s (hibernated)", box)
}

// diffPct is how much b is above a, in percent of a.
func diffPct(b, a time.Duration) float64 {
	return (benchkit.Ratio(float64(b), float64(a)) - 1) * 100
}

// interval is the 90% interval of the difference of the p50s (B over A,
// in %) by a two-level bootstrap over rounds: each resample draws as many
// rounds as there were, with replacement, and from each drawn round's two
// phases as many samples as each had, with replacement. Drawing rounds
// lets a difference between daemons or rounds count as the noise it is;
// drawing a round's two phases together keeps what the design pairs in
// time (load from other work that drifts across the run) paired. a and b
// hold the rounds' phases, in order.
func interval(a, b [][]time.Duration, rng *rand.Rand) (lo, hi float64) {
	rounds := min(len(a), len(b))
	d := make([]float64, resamples)
	for i := range d {
		var ra, rb []time.Duration
		for range rounds {
			r := rng.IntN(rounds)
			ra, rb = draw(ra, a[r], rng), draw(rb, b[r], rng)
		}
		d[i] = diffPct(benchkit.Percentile(rb, 50), benchkit.Percentile(ra, 50))
	}
	slices.Sort(d)
	return d[resamples*5/100], d[resamples*95/100-1]
}

// draw appends to out len(p) samples of p, drawn with replacement.
func draw(out, p []time.Duration, rng *rand.Rand) []time.Duration {
	for range p {
		out = append(out, p[rng.IntN(len(p))])
	}
	return out
}

func ms(d []time.Duration) []float64 {
	out := make([]float64, len(d))
	for i, x := range d {
		out[i] = benchkit.InUnit(x, "ms")
	}
	return out
}

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

// host describes this machine.
func host() Host {
	load := benchkit.LoadAvg() // first, before this runs anything
	model, virt := benchkit.CPU()
	h := Host{CPUs: runtime.NumCPU(), CPUModel: model, Accel: "tcg", QEMU: benchkit.QEMUVersion(), Kernel: benchkit.KernelRelease(), Go: runtime.Version(), LoadBefore: load}
	if virt {
		h.Accel = "kvm"
	}
	return h
}

func printTable(w io.Writer, rep Report) {
	h, s := rep.Host, rep.Setup
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, Linux %s; load average %s before, %s after\n",
		h.CPUs, h.CPUModel, benchkit.DescribeAccel(h.Accel), h.QEMU, h.Kernel, h.LoadBefore, h.LoadAfter)
	fmt.Fprintf(w, "box: %s, %s, 1 vCPU, %s, %s runner. %d round(s) of phase A (a daemon without --metrics-listen) then phase B (with it,\n"+
		"/metrics scraped every %s); each phase a fresh daemon, the box resumed untimed, then %d untimed and %d timed forks\n"+
		"(`boxd fork %s %s`, then `boxd rm %s`) and resumes (`boxd hibernate %s`, then `boxd resume %s`), each once the root's QEMUs had settled\n\n",
		box, s.Memory, guest.DefaultImage, s.Runner, s.Rounds, s.ScrapeEvery, s.WarmUps, s.Reps, box, kid, kid, box, box)

	benchkit.PrintRows(w, rep.Rows, cell)

	fmt.Fprintf(w, "\nwith metrics (B) against without (A): the difference of the percentiles, and a 90%% interval of the p50 difference\n"+
		"by a two-level bootstrap (rounds, each with its A and B, then samples in them; %d resamples), judged against +%g%%:\n", resamples, s.BoundPct)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "\tn (A, B)\tp50\tp90\tp50 interval\tagainst the bound\t")
	for _, c := range rep.Comparisons {
		fmt.Fprintf(tw, "%s\t%d, %d\t%+.1f%%\t%+.1f%%\t%+.1f%% .. %+.1f%%\t%s\t\n", c.Operation, c.NWithout, c.NWith, c.P50DiffPct, c.P90DiffPct, c.P50DiffLow, c.P50DiffHigh, c.Why)
	}
	tw.Flush()

	fmt.Fprintf(w, "\np50 of each phase (ms), and each round's difference B over A:\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	head := []string{""}
	for _, p := range rep.Phases {
		head = append(head, p.Name)
	}
	fmt.Fprintln(tw, strings.Join(append(head, "B-A by round"), "\t")+"\t")
	for _, c := range rep.Comparisons {
		line := []string{c.Operation}
		for _, p := range rep.Phases {
			line = append(line, fmt.Sprintf("%.1f", p.p50(c.Operation)))
		}
		var rd []string
		for _, d := range c.RoundDiffPct {
			rd = append(rd, fmt.Sprintf("%+.1f%%", d))
		}
		fmt.Fprintln(tw, strings.Join(append(line, strings.Join(rd, " ")), "\t")+"\t")
	}
	tw.Flush()
	for _, c := range rep.Comparisons {
		a, b := spread(rep.Phases, c.Operation, false), spread(rep.Phases, c.Operation, true)
		fmt.Fprintf(w, "%s: the phases' p50s span %.1f%% of their median without metrics, %.1f%% with\n", c.Operation, a, b)
	}

	fmt.Fprintf(w, "\nscrapes in the B phases: %d, every one 200 with boxd_boxes; each took p50 %.1f ms, p90 %.1f ms, at most %.1f ms\n"+
		"(a daemon's first scrape waits for the store's report, which later ones read from a copy at most a minute old)\n",
		rep.Scrapes.N, rep.Scrapes.P50Ms, rep.Scrapes.P90Ms, rep.Scrapes.MaxMs)
	c := rep.Cleanup
	left := "none"
	if len(c.ProcessesLeft) > 0 {
		left = strings.Join(c.ProcessesLeft, "; ")
	}
	fmt.Fprintf(w, "clean-up: %d boxes removed at the end; boxd kept %d snapshots and %d disk overlay files of removed boxes (dropped, gc freed %s); QEMUs or daemons of the root left after the daemon stopped (pgrep): %s\n",
		c.BoxesRemoved, c.SnapshotsRemoved, c.DisksRemoved, benchkit.Size(c.GCFreedBytes), left)
	fmt.Fprintf(w, "measured in %.0f s\n", rep.Seconds)
}

// judge says what c's interval lets one conclude about bound, with
// rounds rounds: a verdict and why.
func judge(c Comparison, rounds int, bound float64) (verdict, why string) {
	switch {
	case rounds < 2:
		return "cannot tell", "one round: no phase-to-phase spread to judge by"
	case c.P50DiffHigh <= bound:
		return "within", fmt.Sprintf("within +%g%%: the interval's top is under it", bound)
	case c.P50DiffLow > bound:
		return "above", fmt.Sprintf("above +%g%%: the interval's bottom is over it", bound)
	}
	return "cannot tell", fmt.Sprintf("cannot tell: the interval spans +%g%%; this run's noise is wider than the bound", bound)
}

// spread is the range of the phases' p50s of op, with metrics or without,
// in percent of their median.
func spread(phases []Phase, op string, metrics bool) float64 {
	var v []time.Duration
	for _, p := range phases {
		if p.Metrics != metrics {
			continue
		}
		v = append(v, time.Duration(p.p50(op)*float64(time.Millisecond)))
	}
	if len(v) == 0 {
		return 0
	}
	return benchkit.Ratio(float64(slices.Max(v)-slices.Min(v)), float64(benchkit.Percentile(v, 50))) * 100
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f benchkit.Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	out := fmt.Sprintf("%.1f %s", f.Value, unit)
	if f.N > 1 {
		out += fmt.Sprintf(" (%.1f-%.1f, n %d)", f.Min, f.Max, f.N)
	}
	return out
}
