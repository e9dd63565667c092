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
	Machine  Machine         `json:"machine"`
	Fault    FaultService    `json:"fault_service"`
	Restore  ScatterRestore  `json:"scattered_restore"`
	Capture  CaptureResults  `json:"capture"`
	Goals    map[string]Goal `json:"goals"`
	Failures []string        `json:"failures,omitempty"`
}

type Machine struct {
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	Kernel     string `json:"kernel"`
	Go         string `json:"go"`
	Reps       int    `json:"reps"`
	Pinning    string `json:"pinning"`
}

// Placement is one placement of part 1: Go handler against the C baseline,
// in wall-clock time and in CPU time (of the whole process, every thread,
// while the pages are touched).
type Placement struct {
	GoUsPerPage float64   `json:"go_us_per_page"`
	CUsPerPage  float64   `json:"c_us_per_page"`
	Ratio       float64   `json:"go_vs_c"`
	GoRuns      []float64 `json:"go_runs"`
	CRuns       []float64 `json:"c_runs"`
	GoFaults    int64     `json:"go_faults"`

	GoCPUUsPerPage float64   `json:"go_cpu_us_per_page"`
	CCPUUsPerPage  float64   `json:"c_cpu_us_per_page"`
	CPURatio       float64   `json:"go_vs_c_cpu"`
	GoCPURuns      []float64 `json:"go_cpu_runs"`
	CCPURuns       []float64 `json:"c_cpu_runs"`
}

// add records a run of the C baseline.
func (p *Placement) add(c cResult) {
	p.CRuns = append(p.CRuns, c.usPerPage)
	if c.cpuUsPerPage > 0 {
		p.CCPURuns = append(p.CCPURuns, c.cpuUsPerPage)
	}
}

// finish takes the medians of the runs and their ratios.
func (p *Placement) finish() {
	p.GoUsPerPage, p.CUsPerPage = median(p.GoRuns), median(p.CRuns)
	p.Ratio = benchkit.Ratio(p.GoUsPerPage, p.CUsPerPage)
	p.GoCPUUsPerPage, p.CCPUUsPerPage = median(p.GoCPURuns), median(p.CCPURuns)
	if p.CCPUUsPerPage > 0 {
		p.CPURatio = benchkit.Ratio(p.GoCPUUsPerPage, p.CCPUUsPerPage)
	}
}

type FaultService struct {
	Pages   int    `json:"pages"`
	Content string `json:"content"`
	// The Go handler serving every page from the store (pread, SHA-256
	// check against the chunk id; memory is stored raw), as a restore does.
	SameCPU   Placement  `json:"same_cpu"`
	Different *Placement `json:"different_cpus,omitempty"`
	// The same from a store holding the pages compressed with s2, as disk
	// blocks are and memory was before (pread, s2 decode, SHA-256 check).
	SameCPUCompressed   Placement  `json:"same_cpu_s2"`
	DifferentCompressed *Placement `json:"different_cpus_s2,omitempty"`
	// Bytes the snapshot's pages take in the store, raw, and compressed.
	StoredBytes           int64 `json:"stored_bytes"`
	CompressedStoredBytes int64 `json:"s2_stored_bytes"`
	// The Go handler serving every page from an overlay in host memory
	// (UFFDIO_COPY from the overlay): the C baseline's work.
	SameCPUMemory   Placement  `json:"same_cpu_from_memory"`
	DifferentMemory *Placement `json:"different_cpus_from_memory,omitempty"`
	// The C baseline under taskset -c 0,1, placement left to the scheduler.
	CUnpinned     float64   `json:"c_unpinned_us_per_page"`
	CUnpinnedRuns []float64 `json:"c_unpinned_runs"`
	CMemcpyGBps   float64   `json:"c_memcpy_gbps"`
	// Reading one page from the store, as the handler does on each fault
	// (cas.Store.GetLocated: pread, SHA-256 check), alone.
	StoreReadUs float64 `json:"store_read_us_per_page"`
}

type TouchResult struct {
	Ms         float64   `json:"ms"`
	Runs       []float64 `json:"runs_ms"`
	VsCopy     float64   `json:"vs_copy"`
	Faults     int64     `json:"faults"`
	Copied     int64     `json:"copied"`
	Zeroed     int64     `json:"zeroed"`
	Prefetched int64     `json:"prefetched"`
}

type PrefetchResult struct {
	TouchResult
	// From Start until PrefetchDone (includes Start).
	PrefetchMs     float64   `json:"prefetch_ms"`
	PrefetchRuns   []float64 `json:"prefetch_runs_ms"`
	PrefetchVsCopy float64   `json:"prefetch_vs_copy"`
	WorkingSet     int       `json:"working_set_pages"`
}

type ScatterRestore struct {
	SnapshotPages int            `json:"snapshot_pages"`
	Placement     string         `json:"placement"`
	TouchedPages  int            `json:"touched_pages"`
	ZeroTouched   int            `json:"touched_zero_pages"`
	StartMs       float64        `json:"start_ms"` // Start: resolving the page table
	NoHelp        TouchResult    `json:"no_help"`
	FaultAround   TouchResult    `json:"fault_around_16"`
	Prefetch      PrefetchResult `json:"prefetch"`
	// Compacted and CompactedAround are NoHelp and FaultAround from the
	// same snapshot in a store compacted afterwards (CompactedFrames zstd
	// frames).
	Compacted       TouchResult `json:"compacted_no_help"`
	CompactedAround TouchResult `json:"compacted_fault_around_16"`
	CompactedFrames int64       `json:"compacted_frames"`
	CopyMs          float64     `json:"copy_ms"`
	CopyRuns        []float64   `json:"copy_runs_ms"`
}

type CaptureRun struct {
	Seconds     float64   `json:"seconds"`
	Runs        []float64 `json:"runs_s"`
	RegionMBps  float64   `json:"region_mb_per_s"`
	DirtyMBps   float64   `json:"dirty_mb_per_s,omitempty"`
	NewChunks   int64     `json:"new_chunks"`
	ReadPages   int       `json:"pages_read"`
	SnapshotMap string    `json:"-"`
}

type CaptureResults struct {
	RegionBytes int64      `json:"region_bytes"`
	DirtyPages  int        `json:"dirty_pages"`
	Full        CaptureRun `json:"full"`
	Dirty       CaptureRun `json:"dirty_bitmap"`
	Recapture   CaptureRun `json:"full_with_parent"`
}

type Goal struct {
	Text  string  `json:"goal"`
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	Met   bool    `json:"met"`
}

// newReport is a report with the facts of this machine and run filled in.
func newReport() *Report {
	return &Report{
		Machine: Machine{
			CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0),
			Kernel: benchkit.KernelRelease(), Go: runtime.Version(), Reps: *reps,
			Pinning: "Go: sched_setaffinity on every thread in /proc/self/task (threads created later inherit it); " +
				"C: taskset -c 0, then sched_setaffinity on its threads once the handler thread exists",
		},
		Goals: map[string]Goal{},
	}
}

// median is the middle of xs, or the mean of the middle two.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func goals(rep *Report) {
	if rep.Fault.SameCPU.CUsPerPage > 0 {
		v := rep.Fault.SameCPU.Ratio
		rep.Goals["fault_service_same_cpu"] = Goal{Text: "per-fault service within 1.5x of the C baseline, same CPU", Value: v, Limit: 1.5, Met: v <= 1.5}
	}
	if d := rep.Fault.Different; d != nil && d.CUsPerPage > 0 {
		rep.Goals["fault_service_different_cpus"] = Goal{Text: "per-fault service within 1.5x of the C baseline, different CPUs", Value: d.Ratio, Limit: 1.5, Met: d.Ratio <= 1.5}
	}
	if rep.Restore.CopyMs > 0 && len(rep.Restore.Prefetch.Runs) > 0 {
		v := rep.Restore.Prefetch.VsCopy
		rep.Goals["prefetched_touch_vs_copy"] = Goal{Text: "with prefetch, touching the working set costs <= 2x copying it", Value: v, Limit: 2, Met: v <= 2}
	}
}

func printTable(w io.Writer, rep *Report) {
	m := rep.Machine
	fmt.Fprintf(w, "============================ memstore benchmark ============================\n")
	fmt.Fprintf(w, "%d CPUs, GOMAXPROCS %d, Linux %s, %s; medians of %d runs\n", m.CPUs, m.GOMAXPROCS, m.Kernel, m.Go, m.Reps)
	fmt.Fprintf(w, "pinning: %s\n\n", m.Pinning)

	fs := rep.Fault
	if fs.Pages > 0 {
		fmt.Fprintf(w, "1. fault service: %d MiB snapshot (%s), one page per fault,\n", faultMiB, fs.Content)
		fmt.Fprintf(w, "   no prefetch; one thread touches every page once, in order\n")
		fmt.Fprintf(w, "   C serves every page from memory (UFFDIO_COPY from a copy of the image); Go from the store,\n")
		fmt.Fprintf(w, "   which keeps memory raw (pread, SHA-256 check, then UFFDIO_COPY), from a store holding the same\n")
		fmt.Fprintf(w, "   pages s2-compressed as before (s2: pread, s2 decode, SHA-256 check, UFFDIO_COPY) and, like for\n")
		fmt.Fprintf(w, "   like, from memory (UFFDIO_COPY from an overlay holding every page). CPU: the whole process,\n")
		fmt.Fprintf(w, "   all threads, while touching.\n")
		fmt.Fprintf(w, "   %-38s %-6s %9s %8s %7s %9s %8s %7s\n", "placement", "Go src", "Go µs/pg", "C µs/pg", "Go/C", "Go CPU", "C CPU", "Go/C")
		row := func(name, src string, p Placement) {
			fmt.Fprintf(w, "   %-38s %-6s %9.2f %8.2f %6.2fx %9.2f %8.2f %6.2fx\n", name, src, p.GoUsPerPage, p.CUsPerPage, p.Ratio, p.GoCPUUsPerPage, p.CCPUUsPerPage, p.CPURatio)
		}
		row("same CPU (everything on CPU 0)", "store", fs.SameCPU)
		row("", "s2", fs.SameCPUCompressed)
		row("", "memory", fs.SameCPUMemory)
		if fs.Different != nil {
			row("different CPUs (toucher 1, handler 0)", "store", *fs.Different)
			if fs.DifferentCompressed != nil {
				row("", "s2", *fs.DifferentCompressed)
			}
			if fs.DifferentMemory != nil {
				row("", "memory", *fs.DifferentMemory)
			}
			fmt.Fprintf(w, "   %-45s %9s %8.2f   runs %s\n", "C, taskset -c 0,1 (scheduler's choice)", "", fs.CUnpinned, runs(fs.CUnpinnedRuns, "%.1f"))
		}
		fmt.Fprintf(w, "   Go faults served per run: %d of %d pages; C memcpy %.2f GB/s\n", fs.SameCPU.GoFaults, fs.Pages, fs.CMemcpyGBps)
		fmt.Fprintf(w, "   reading one page from the store alone (GetLocated: pread, SHA-256): %.2f µs\n", fs.StoreReadUs)
		fmt.Fprintf(w, "   the pages' bytes in the store: %.1f MiB raw, %.1f MiB s2 (%.2fx)\n\n", float64(fs.StoredBytes)/mib, float64(fs.CompressedStoredBytes)/mib, benchkit.Ratio(float64(fs.StoredBytes), float64(fs.CompressedStoredBytes)))
	}

	sr := rep.Restore
	if sr.SnapshotPages > 0 {
		fmt.Fprintf(w, "2. scattered restore: %d MiB snapshot (runs of zero, random and text pages);\n", restoreMiB)
		fmt.Fprintf(w, "   the consumer touches %d random distinct pages (%d MiB, %d of them zero)\n", sr.TouchedPages, sr.TouchedPages*pageSize/mib, sr.ZeroTouched)
		fmt.Fprintf(w, "   placement: %s\n", sr.Placement)
		fmt.Fprintf(w, "   Start (page table of %d pages): %.2f ms, not included below\n", sr.SnapshotPages, sr.StartMs)
		fmt.Fprintf(w, "   %-44s %10s %8s %8s %12s %10s\n", "", "ms", "vs copy", "faults", "fault-filled", "prefetched")
		tr := func(name string, t TouchResult) {
			fmt.Fprintf(w, "   %-44s %10.2f %7.2fx %8d %12d %10d\n", name, t.Ms, t.VsCopy, t.Faults, t.Copied+t.Zeroed, t.Prefetched)
		}
		tr("(a) no help (fault-around 1, no prefetch)", sr.NoHelp)
		tr("(b) fault-around 16", sr.FaultAround)
		tr("(c) prefetch, touch after PrefetchDone", sr.Prefetch.TouchResult)
		fmt.Fprintf(w, "   %-44s %10.2f %7.2fx\n", "    Start → PrefetchDone", sr.Prefetch.PrefetchMs, sr.Prefetch.PrefetchVsCopy)
		fmt.Fprintf(w, "   %-44s %10.2f %7.2fx\n", "(d) copy 32 MiB into fresh anonymous memory", sr.CopyMs, 1.0)
		fmt.Fprintf(w, "   the snapshot again, in a store compacted after the capture (%d zstd frames):\n", sr.CompactedFrames)
		tr("(e) as (a), compacted", sr.Compacted)
		tr("(f) as (b), compacted", sr.CompactedAround)
		fmt.Fprintf(w, "   working set recorded by (a): %d pages\n\n", sr.Prefetch.WorkingSet)
	}

	cr := rep.Capture
	if cr.RegionBytes > 0 {
		fmt.Fprintf(w, "3. capture of %d MiB (runs of zero, random and text pages); %d pages dirty (%.0f%%)\n", cr.RegionBytes/mib, cr.DirtyPages, dirtyFrac*100)
		fmt.Fprintf(w, "   %-44s %8s %12s %12s %10s\n", "", "s", "region MB/s", "dirty MB/s", "new chunks")
		fmt.Fprintf(w, "   %-44s %8.3f %12.1f %12s %10d\n", "full capture", cr.Full.Seconds, cr.Full.RegionMBps, "", cr.Full.NewChunks)
		fmt.Fprintf(w, "   %-44s %8.3f %12.1f %12.1f %10d\n", "dirty bitmap against the parent", cr.Dirty.Seconds, cr.Dirty.RegionMBps, cr.Dirty.DirtyMBps, cr.Dirty.NewChunks)
		fmt.Fprintf(w, "   %-44s %8.3f %12.1f %12s %10d\n", "changed memory in full, parent set", cr.Recapture.Seconds, cr.Recapture.RegionMBps, "", cr.Recapture.NewChunks)
		fmt.Fprintf(w, "   pages read: full %d, dirty bitmap %d\n\n", cr.Full.ReadPages, cr.Dirty.ReadPages)
	}

	fmt.Fprintf(w, "goals\n")
	for _, k := range []string{"fault_service_same_cpu", "fault_service_different_cpus", "prefetched_touch_vs_copy"} {
		g, ok := rep.Goals[k]
		if !ok {
			continue
		}
		st := "NOT MET"
		if g.Met {
			st = "MET"
		}
		fmt.Fprintf(w, "   %-66s %s\n", fmt.Sprintf("%s (is %.2fx)", g.Text, g.Value), st)
	}
	for _, f := range rep.Failures {
		fmt.Fprintf(w, "FAILED: %s\n", f)
	}
}

func runs(xs []float64, format string) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(s, " ")
}
