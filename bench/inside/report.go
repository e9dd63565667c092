package main

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// Report is the JSON output.
type Report struct {
	Host  Host           `json:"host"`
	Setup Setup          `json:"setup"`
	Rows  []benchkit.Row `json:"rows"`
	Reps  []Rep          `json:"reps"`
	// Clocks says what the child's figures are measured with.
	Clocks  string           `json:"clocks"`
	Cleanup benchkit.Cleanup `json:"cleanup"`
	Seconds float64          `json:"measure_seconds"` // the measurements, set-up and clean-up left out
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
	Memory  string `json:"memory"`
	Reps    int    `json:"reps"`
	WarmUps int    `json:"warm_ups"`
}

// Rep is one round: a fork from the host and one from inside, in the
// order First says. The On-host figures are brought to the host's clock
// by the skews measured around them, and are known within PlusMinus.
type Rep struct {
	First                   string  `json:"first"` // "host" or "inside"
	Child                   string  `json:"inside_child"`
	HostForkMs              float64 `json:"host_fork_ms"`
	HostDevBefore           Clock   `json:"host_fork_dev_clock_before"`
	HostDevAfter            Clock   `json:"host_fork_dev_clock_after"`
	ParentMs                float64 `json:"inside_parent_ms"` // on dev's clock
	ParentOnHostMs          float64 `json:"inside_parent_on_host_ms"`
	ParentOnHostPlusMinusMs float64 `json:"inside_parent_on_host_plus_minus_ms"`
	ChildMs                 float64 `json:"inside_child_ms"` // the child's clock after, less dev's before
	ChildOnHostMs           float64 `json:"inside_child_on_host_ms"`
	ChildOnHostPlusMinusMs  float64 `json:"inside_child_on_host_plus_minus_ms"`
	ExecMs                  float64 `json:"exec_script_ms"` // the boxd exec that ran the script, on the host
	// ParentDateMs and ChildDateMs are a second date right after the one
	// that took the time box fork returned, in each: what one costs there.
	ParentDateMs float64 `json:"inside_parent_date_ms"`
	ChildDateMs  float64 `json:"inside_child_date_ms"`
	DevBefore    Clock   `json:"inside_dev_clock_before"`
	DevAfter     Clock   `json:"inside_dev_clock_after"`
	ChildClock   Clock   `json:"child_clock"`
}

// Clock is a guest's clock less the host's, within PlusMinusMs: the guest's
// `date +%s%N` through boxd exec less the middle of the host's times around
// the exec.
type Clock struct {
	SkewMs      float64 `json:"skew_ms"`
	PlusMinusMs float64 `json:"plus_minus_ms"`
}

func clockOf(s skew) Clock { return Clock{SkewMs: ms(s.d), PlusMinusMs: ms(s.plusMinus)} }

func ms(d time.Duration) float64 { return benchkit.InUnit(d, "ms") }

func (r *Report) add(row benchkit.Row) { r.Rows = append(r.Rows, row) }

// clocksNote says what the child's figures cross; the skews' bounds are
// filled in from the reps.
const clocksNote = "\"Two clocks\": the child's `date +%%s%%N` as box fork returned in it less dev's just before box fork. " +
	"The child's clock was set to the host's when it was made unique; dev's is its own, and it stands still while dev is paused " +
	"for the fork's snapshot (\"lost\"), so on dev's clock the parent's wait looks shorter than it was. " +
	"A clock's skew is the guest's `date +%%s%%N` less the middle of the host's times around it: the narrowest of %d answers " +
	"to lines written to one `boxd exec -i BOX -- sh -c 'while read ...; do date ...'`, known within half that round trip " +
	"(p50: dev %s, a child %s), taken of dev before and after each fork. \"Host's clock\": the parent's wait less what dev's " +
	"clock lost meanwhile, and the child's end and dev's start each less its clock's skew; known within the sum of the two skews' bounds."

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
	fmt.Fprintf(w, "box dev: %s, 1 vCPU, the default image, the qemu runner; %d forks of each kind (after %d untimed), alternating, "+
		"each once the root's machines had settled, each child removed before the next\n\n", s.Memory, s.Reps, s.WarmUps)
	benchkit.PrintRows(w, rep.Rows, cell)
	fmt.Fprintf(w, "\n%s\n", wrap(rep.Clocks, 110))
	c := rep.Cleanup
	left := "none"
	if len(c.ProcessesLeft) > 0 {
		left = strings.Join(c.ProcessesLeft, "; ")
	}
	fmt.Fprintf(w, "clean-up: %d boxes removed at the end; boxd kept %d snapshots and %d disk overlay files of removed boxes (dropped, gc freed %s); QEMUs or daemons of the root left after the daemon stopped (pgrep): %s\n",
		c.BoxesRemoved, c.SnapshotsRemoved, c.DisksRemoved, benchkit.Size(c.GCFreedBytes), left)
	fmt.Fprintf(w, "measured in %.0f s\n", rep.Seconds)
}

// cell formats a figure: the value, and the range when there are a few
// samples to show it of.
func cell(f benchkit.Figure, unit string) string {
	if f.N == 0 {
		return "-"
	}
	out := fmt.Sprintf("%.1f %s", f.Value, unit)
	if f.N > 1 {
		out += fmt.Sprintf(" (%.1f..%.1f)", f.Min, f.Max)
	}
	return out
}

// wrap breaks s into lines of at most width characters, at spaces.
func wrap(s string, width int) string {
	var b strings.Builder
	n := 0
	for i, word := range strings.Fields(s) {
		switch {
		case i == 0:
		case n+1+len(word) > width:
			b.WriteByte('\n')
			n = 0
		default:
			b.WriteByte(' ')
			n++
		}
		b.WriteString(word)
		n += len(word)
	}
	return b.String()
}
