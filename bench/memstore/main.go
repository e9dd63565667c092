// Command memstore measures boxd's guest-memory store side by side with the
// floors it is judged against, in one run:
//
//  1. Fault service: a restore of a 64 MiB snapshot with one page per fault
//     and no prefetch, touched page by page by one thread, against the C
//     userfaultfd baseline (bench/baseline/uffd_baseline.c), with the faulting
//     thread and the handler on the same CPU and on different CPUs.
//  2. Scattered restore: a 256 MiB snapshot whose consumer touches 8192
//     scattered pages (32 MiB), with no help, with fault-around, and with the
//     working set of an earlier restore prefetched, against copying 32 MiB
//     into fresh anonymous memory.
//  3. Capture: 256 MiB in full, and 256 MiB with 10% of the pages dirty
//     (dirty bitmap against a parent).
//
// It needs root (userfaultfd), gcc and taskset. Goals are reported as met or
// not met; a missed goal does not change the exit status.
//
// Usage: go run ./bench/memstore [-json] [-reps N] [-baseline FILE] [-only PART] [-cpuprofile FILE]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/memstore"
)

const (
	pageSize = memstore.PageSize
	mib      = 1 << 20

	faultMiB     = 64         // part 1: snapshot size
	restoreMiB   = 256        // part 2: snapshot size
	touchedPages = 8192       // part 2: pages the consumer touches (32 MiB)
	captureMiB   = 256        // part 3: region size
	dirtyFrac    = 0.10       // part 3: fraction of pages dirty
	seed         = 0x626f7864 // fixed: every run touches the same pages
)

var (
	jsonOut  = flag.Bool("json", false, "print the results as one JSON object on stdout (progress goes to stderr)")
	reps     = flag.Int("reps", 3, "repetitions of each measurement; the median is reported")
	baseline = flag.String("baseline", "bench/baseline/uffd_baseline.c", "C baseline source; a relative path is taken from the repository root")
	only     = flag.String("only", "", "run only this part: fault, restore or capture (default: all three)")
	cpuProf  = flag.String("cpuprofile", "", "write a CPU profile of the measurements to this file")
)

func main() {
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: memstore [-json] [-reps N] [-baseline FILE] [-only PART] [-cpuprofile FILE]\n\n"+
			"Measures boxd's lazy memory restore and capture against a C userfaultfd\n"+
			"baseline and a plain copy. Needs root, gcc and taskset.\n\n")
		flag.PrintDefaults()
	}
	benchkit.Main("memstore", badFlags, "userfaultfd is root-only here", run)
}

// badFlags says what is wrong with the flags' values ("" for nothing).
func badFlags() string {
	if *reps < 1 {
		return "-reps must be at least 1"
	}
	switch *only {
	case "", "fault", "restore", "capture":
	default:
		return "-only must be fault, restore or capture"
	}
	return ""
}

// run measures the three parts in turn and prints the report. It fails when
// a measurement failed, after printing what the others found; a missed goal
// is not a failure.
func run(ctx context.Context) error {
	// A goroutine blocked in a page fault keeps its P: leave Ps free for the
	// handler and the prefetcher.
	runtime.GOMAXPROCS(max(4, runtime.NumCPU()+2))

	e, err := setUp(ctx)
	if err != nil {
		return err
	}
	defer e.tearDown()
	rep := newReport()
	steps := []struct {
		part, name string
		f          func() error
	}{
		{"fault", "fault service", func() error { return faultService(rep, e) }},
		{"restore", "scattered restore", func() error { return scatteredRestore(rep, e) }},
		{"capture", "capture", func() error { return captureBench(rep, e.tmp) }},
	}
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("starting the CPU profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	for _, s := range steps {
		if *only != "" && s.part != *only {
			continue
		}
		if err := s.f(); err != nil {
			benchkit.Progress("%s: FAILED: %v", s.name, err)
			rep.Failures = append(rep.Failures, s.name+": "+err.Error())
		}
		_ = pinAll(&e.orig, -1)
	}
	goals(rep)
	if err := benchkit.Print(os.Stdout, *jsonOut, rep, printTable); err != nil {
		return err
	}
	if len(rep.Failures) > 0 {
		return fmt.Errorf("%d of %d measurements failed", len(rep.Failures), len(steps))
	}
	return nil
}
