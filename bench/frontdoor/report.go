package main

import (
	"fmt"
	"io"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// Report is the JSON output.
type Report struct {
	Host    Host             `json:"host"`
	Setup   Setup            `json:"setup"`
	Kex     Kex              `json:"kex"`
	Rows    []benchkit.Row   `json:"rows"`
	Many    string           `json:"many_boxes"` // how the boxes for the big ls were made
	Cleanup benchkit.Cleanup `json:"cleanup"`
	Seconds float64          `json:"measure_seconds"` // the measurements, set-up and clean-up left out
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
	UploadMiB  int    `json:"upload_mib"`
	UploadReps int    `json:"upload_reps"`
}

func (r *Report) add(row benchkit.Row) { r.Rows = append(r.Rows, row) }

func secs(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }

// host describes this machine.
func host() Host {
	load := benchkit.LoadAvg() // first, before this runs anything
	model, virt := benchkit.CPU()
	h := Host{CPUs: runtime.NumCPU(), CPUModel: model, Accel: "tcg", QEMU: benchkit.QEMUVersion(), Kernel: benchkit.KernelRelease(), Go: runtime.Version(), LoadBefore: load}
	if virt {
		h.Accel = "kvm"
	}
	if out, err := exec.Command("ssh", "-V").CombinedOutput(); err == nil {
		h.OpenSSH = firstLine(string(out))
	}
	return h
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}

func printTable(w io.Writer, rep Report) {
	h, s := rep.Host, rep.Setup
	fmt.Fprintf(w, "\nhost: %d cores (%s), accel %s, QEMU %s, %s, Linux %s; load average %s before, %s after\n",
		h.CPUs, h.CPUModel, benchkit.DescribeAccel(h.Accel), h.QEMU, h.OpenSSH, h.Kernel, h.LoadBefore, h.LoadAfter)
	fmt.Fprintf(w, "box: %s, 1 vCPU, the default image; ssh: a fresh connection each time, BatchMode, an ed25519 key;\n"+
		"%d ssh round trips (after %d untimed), %d wakes, %d forks of each kind, %d runs of each ls\n\n",
		s.Memory, s.Reps, warmUps, s.WakeReps, s.ForkReps, s.LsReps)

	benchkit.PrintRows(w, rep.Rows, cell)
	fmt.Fprintf(w, "\nthe boxes for the big ls: %s\n", rep.Many)
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
