// Command memstore measures boxd's guest-memory store side by side with the
// floors it is judged against, in one run:
//
//  1. Fault service: a restore of a 64 MiB snapshot with one page per fault
//     and no prefetch, touched page by page by one thread, against the C
//     userfaultfd baseline (shared/bench/uffd_baseline.c), with the faulting
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
// Usage: go run ./bench/memstore [-json] [-reps N] [-baseline FILE]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/snapshotter"
	"golang.org/x/sys/unix"
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
	baseline = flag.String("baseline", "../shared/bench/uffd_baseline.c", "C baseline source; a relative path is taken from the repository root")
)

// ---------------------------------------------------------------- results

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

// Placement is one placement of part 1: Go handler against the C baseline.
type Placement struct {
	GoUsPerPage float64   `json:"go_us_per_page"`
	CUsPerPage  float64   `json:"c_us_per_page"`
	Ratio       float64   `json:"go_vs_c"`
	GoRuns      []float64 `json:"go_runs"`
	CRuns       []float64 `json:"c_runs"`
	GoFaults    int64     `json:"go_faults"`
}

type FaultService struct {
	Pages     int        `json:"pages"`
	Content   string     `json:"content"`
	SameCPU   Placement  `json:"same_cpu"`
	Different *Placement `json:"different_cpus,omitempty"`
	// The C baseline under taskset -c 0,1, placement left to the scheduler.
	CUnpinned     float64   `json:"c_unpinned_us_per_page"`
	CUnpinnedRuns []float64 `json:"c_unpinned_runs"`
	CMemcpyGBps   float64   `json:"c_memcpy_gbps"`
	// Reading one page from the store, as the handler does on each fault
	// (cas.Store.GetLocated: pread, s2 decode, SHA-256 check), alone.
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
	CopyMs        float64        `json:"copy_ms"`
	CopyRuns      []float64      `json:"copy_runs_ms"`
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

// ---------------------------------------------------------------- main

func main() {
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: memstore [-json] [-reps N] [-baseline FILE]\n\n"+
			"Measures boxd's lazy memory restore and capture against a C userfaultfd\n"+
			"baseline and a plain copy. Needs root, gcc and taskset.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *reps < 1 {
		*reps = 1
	}
	os.Exit(run())
}

func logf(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }

func run() int {
	// A goroutine blocked in a page fault keeps its P: leave Ps free for the
	// handler and the prefetcher.
	runtime.GOMAXPROCS(max(4, runtime.NumCPU()+2))

	if os.Geteuid() != 0 {
		logf("memstore bench: must run as root (userfaultfd is root-only here)")
		return 2
	}
	for _, tool := range []string{"gcc", "taskset"} {
		if _, err := exec.LookPath(tool); err != nil {
			logf("memstore bench: missing tool: %s", tool)
			return 2
		}
	}
	var orig unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		logf("memstore bench: sched_getaffinity: %v", err)
		return 1
	}
	cpus := cpuList(&orig)
	if len(cpus) == 0 || !slices.Contains(cpus, 0) {
		logf("memstore bench: CPU 0 is not available to this process (affinity %v)", cpus)
		return 2
	}

	src := *baseline
	if !filepath.IsAbs(src) {
		src = filepath.Join(repoRoot(), src)
	}
	tmp, err := os.MkdirTemp("", "boxd-memstore-bench-")
	if err != nil {
		logf("memstore bench: %v", err)
		return 1
	}
	defer os.RemoveAll(tmp)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		os.RemoveAll(tmp)
		os.Exit(130)
	}()

	var uts unix.Utsname
	_ = unix.Uname(&uts)
	rep := &Report{
		Machine: Machine{
			CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0),
			Kernel: unix.ByteSliceToString(uts.Release[:]), Go: runtime.Version(), Reps: *reps,
			Pinning: "Go: sched_setaffinity on every thread in /proc/self/task (threads created later inherit it); " +
				"C: taskset -c 0, then sched_setaffinity on its threads once the handler thread exists",
		},
		Goals: map[string]Goal{},
	}

	bin := filepath.Join(tmp, "uffd_baseline")
	logf("== building the C baseline: gcc -O2 -pthread -o %s %s", bin, src)
	if out, err := exec.Command("gcc", "-O2", "-pthread", "-o", bin, src).CombinedOutput(); err != nil {
		logf("memstore bench: building the C baseline: %v\n%s", err, out)
		return 1
	}

	steps := []struct {
		name string
		f    func() error
	}{
		{"fault service", func() error { return faultService(rep, tmp, bin, &orig, cpus) }},
		{"scattered restore", func() error { return scatteredRestore(rep, tmp, &orig, cpus) }},
		{"capture", func() error { return captureBench(rep, tmp) }},
	}
	for _, s := range steps {
		if err := s.f(); err != nil {
			logf("memstore bench: %s: %v", s.name, err)
			rep.Failures = append(rep.Failures, s.name+": "+err.Error())
		}
		_ = pinAll(&orig, -1)
	}
	goals(rep)

	if *jsonOut {
		enc := json.NewEncoder(os.Stdout)
		if err := enc.Encode(rep); err != nil {
			logf("memstore bench: %v", err)
			return 1
		}
	} else {
		printTable(os.Stdout, rep)
	}
	if len(rep.Failures) > 0 {
		return 1
	}
	return 0
}

// repoRoot is the nearest directory at or above the working directory with
// boxd's go.mod, or the working directory.
func repoRoot() string {
	wd, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := wd; ; d = filepath.Dir(d) {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/boxd-dev/boxd\n")) {
			return d
		}
		if filepath.Dir(d) == d {
			return wd
		}
	}
}

// ---------------------------------------------------------------- memory content

var words = strings.Fields(`the of and to in is that for it as was with be by on not he this are or
his from at which but have an they you were her she there been one all we their has would when if
so no will can more other into some could them than then its only time out these two may first
kernel page memory boxd snapshot guest thread socket buffer request return error value struct
config file path data null true false http json user session token cache index table`)

// kind of page content
const (
	kindZero = iota
	kindRandom
	kindText
)

// fillPage writes content of the given kind into pg.
func fillPage(pg []byte, kind int, r *rand.Rand, c *rand.ChaCha8, tag int) {
	switch kind {
	case kindZero:
		clear(pg)
	case kindRandom:
		_, _ = c.Read(pg)
	case kindText:
		// Build the text apart: appending to pg would spill into the
		// next page, which shares pg's backing array.
		b := make([]byte, 0, len(pg)+64)
		b = fmt.Appendf(b, "[%d] ", tag)
		for len(b) < len(pg) {
			b = append(b, words[r.IntN(len(words))]...)
			if r.IntN(12) == 0 {
				b = append(b, ".\n"...)
			} else {
				b = append(b, ' ')
			}
		}
		copy(pg, b[:len(pg)])
	}
}

// guestImage returns pages of guest-like memory: runs of 1 to 64 pages, each
// run zero (30%), random bytes (30%) or text (40%). With noZero, zero runs
// become text.
func guestImage(s uint64, pages int, noZero bool) ([]byte, []int) {
	r := rand.New(rand.NewPCG(s, 1))
	var key [32]byte
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	c := rand.NewChaCha8(key)
	b := make([]byte, pages*pageSize)
	kinds := make([]int, pages)
	for p := 0; p < pages; {
		n := min(1+r.IntN(64), pages-p)
		k := kindText
		switch x := r.IntN(10); {
		case x < 3:
			k = kindZero
		case x < 6:
			k = kindRandom
		}
		if noZero && k == kindZero {
			k = kindText
		}
		for i := p; i < p+n; i++ {
			kinds[i] = k
			fillPage(b[i*pageSize:(i+1)*pageSize], k, r, c, i)
		}
		p += n
	}
	return b, kinds
}

// ---------------------------------------------------------------- threads and CPUs

func cpuList(s *unix.CPUSet) []int {
	var out []int
	for i := range 1024 {
		if s.IsSet(i) {
			out = append(out, i)
		}
	}
	return out
}

func cpuSet(cpus ...int) *unix.CPUSet {
	var s unix.CPUSet
	for _, c := range cpus {
		s.Set(c)
	}
	return &s
}

// pinAll sets the affinity of every thread of this process but except
// (a thread id, or -1) to set, repeating until a pass finds no thread it has
// not set: a thread created meanwhile by a thread already set inherits the
// set.
func pinAll(set *unix.CPUSet, except int) error {
	done := map[int]bool{}
	for range 100 {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		fresh := false
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || tid == except || done[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("sched_setaffinity(%d): %w", tid, err)
			}
			done[tid] = true
			fresh = true
		}
		if !fresh {
			return nil
		}
	}
	return errors.New("threads keep appearing")
}

var sink atomic.Int64

// onThread runs f in a goroutine locked to its own OS thread, pinned first
// to cpu when cpu >= 0, and returns how long f took. The goroutine returns
// still locked, so that its thread (and its affinity) ends with it.
func onThread(cpu int, f func()) (time.Duration, error) {
	type res struct {
		d   time.Duration
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		if cpu >= 0 {
			if err := unix.SchedSetaffinity(0, cpuSet(cpu)); err != nil {
				ch <- res{err: fmt.Errorf("pinning a thread to CPU %d: %w", cpu, err)}
				return
			}
		}
		t0 := time.Now()
		f()
		ch <- res{d: time.Since(t0)}
	}()
	r := <-ch
	return r.d, r.err
}

// touch reads one byte of every page of region in order (order nil), or of
// the listed pages in the listed order, on a thread of its own (see
// onThread), and returns how long that took.
func touch(region []byte, order []int, cpu int) (time.Duration, error) {
	return onThread(cpu, func() {
		var s int64
		if order == nil {
			for off := 0; off < len(region); off += pageSize {
				s += int64(region[off])
			}
		} else {
			for _, p := range order {
				s += int64(region[p*pageSize])
			}
		}
		sink.Add(s)
	})
}

func anon(size int) ([]byte, error) {
	return unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
}

// ---------------------------------------------------------------- C baseline

type cResult struct {
	usPerPage, memcpyGBps float64
}

// runC runs the C baseline on 64 MiB. placement: "same" (taskset -c 0),
// "different" (started under taskset -c 0; once its handler thread exists,
// the main, touching thread is moved to CPU 1: the handler stays on CPU 0),
// or "unpinned" (taskset -c 0,1).
func runC(bin, placement string) (cResult, error) {
	mask := "0"
	if placement == "unpinned" {
		mask = "0,1"
	}
	cmd := exec.Command("taskset", "-c", mask, bin, strconv.Itoa(faultMiB))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return cResult{}, err
	}
	if placement == "different" {
		// taskset execs the baseline in place: same pid. Wait for the
		// handler thread (it starts after the 64 MiB source is filled).
		pid := cmd.Process.Pid
		moved := false
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); {
			ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
			if err != nil {
				break
			}
			if len(ents) >= 2 {
				exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
				if filepath.Base(exe) == filepath.Base(bin) {
					if err := unix.SchedSetaffinity(pid, cpuSet(1)); err != nil {
						_ = cmd.Process.Kill()
						_ = cmd.Wait()
						return cResult{}, fmt.Errorf("moving the baseline's main thread: %w", err)
					}
					moved = true
					break
				}
			}
			time.Sleep(20 * time.Microsecond)
		}
		if !moved {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return cResult{}, errors.New("the baseline's handler thread never appeared")
		}
	}
	if err := cmd.Wait(); err != nil {
		return cResult{}, fmt.Errorf("%w: %s", err, out.Bytes())
	}
	var r cResult
	var pages int
	for _, f := range strings.Fields(out.String()) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		switch k {
		case "pages":
			pages, _ = strconv.Atoi(v)
		case "us_per_page":
			r.usPerPage, _ = strconv.ParseFloat(v, 64)
		case "memcpy_gbps":
			r.memcpyGBps, _ = strconv.ParseFloat(v, 64)
		}
	}
	if pages != faultMiB*mib/pageSize || r.usPerPage <= 0 {
		return cResult{}, fmt.Errorf("unexpected baseline output: %q", out.String())
	}
	return r, nil
}

// ---------------------------------------------------------------- part 1

// goFault restores the snapshot one page per fault with no prefetch and
// touches every page in order. different: the toucher runs on CPU 1 and
// every other thread (the handler's included) on CPU 0; otherwise all
// threads run on CPU 0.
func goFault(g *snapshotter.Graph, snap string, img []byte, orig *unix.CPUSet, different bool) (float64, memstore.Stats, error) {
	region, err := anon(len(img))
	if err != nil {
		return 0, memstore.Stats{}, err
	}
	defer func() { _ = unix.Munmap(region) }()
	runtime.GC()
	// Pin first, so that the handler's thread (new or reused) is on CPU 0.
	if err := pinAll(cpuSet(0), -1); err != nil {
		return 0, memstore.Stats{}, err
	}
	defer func() { _ = pinAll(orig, -1) }()
	r, err := memstore.Start(context.Background(), g, snap, "", region, memstore.Options{FaultAround: 1, Prefetch: []uint64{}})
	if err != nil {
		return 0, memstore.Stats{}, err
	}
	cpu := -1
	if different {
		cpu = 1
	}
	d, terr := touch(region, nil, cpu)
	cerr := r.Close()
	st := r.Stats()
	if err := errors.Join(terr, cerr); err != nil {
		return 0, st, err
	}
	if !bytes.Equal(region, img) {
		return 0, st, errors.New("restored memory differs from the snapshot")
	}
	return d.Seconds() * 1e6 / float64(len(img)/pageSize), st, nil
}

func faultService(rep *Report, tmp, bin string, orig *unix.CPUSet, cpus []int) error {
	pages := faultMiB * mib / pageSize
	fs := &rep.Fault
	fs.Pages = pages
	fs.Content = "no zero pages: runs of random bytes and text"
	root := filepath.Join(tmp, "fault")
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	defer func() { g.Close(); os.RemoveAll(root) }()
	logf("== part 1: fault service, %d MiB snapshot, one page per fault", faultMiB)
	img, _ := guestImage(seed, pages, true)
	if _, err := memstore.Capture(context.Background(), g, bytes.NewReader(img), int64(len(img)), memstore.CaptureOptions{Name: "fault"}); err != nil {
		return err
	}
	if fs.StoreReadUs, err = storeRead(g, "fault"); err != nil {
		return fmt.Errorf("reading pages from the store: %w", err)
	}
	logf("  store read alone (GetLocated, one page a call): %.2f µs/page", fs.StoreReadUs)
	twoCPUs := len(cpus) >= 2 && slices.Contains(cpus, 1)
	var diff Placement
	var memcpy []float64
	for i := range *reps {
		c, err := runC(bin, "same")
		if err != nil {
			return fmt.Errorf("c baseline, same CPU: %w", err)
		}
		fs.SameCPU.CRuns = append(fs.SameCPU.CRuns, c.usPerPage)
		memcpy = append(memcpy, c.memcpyGBps)
		us, st, err := goFault(g, "fault", img, orig, false)
		if err != nil {
			return fmt.Errorf("go handler, same CPU: %w", err)
		}
		fs.SameCPU.GoRuns = append(fs.SameCPU.GoRuns, us)
		fs.SameCPU.GoFaults = st.Faults
		logf("  rep %d same CPU:       C %6.2f µs/page   Go %6.2f µs/page (%d faults)", i+1, c.usPerPage, us, st.Faults)
		if !twoCPUs {
			continue
		}
		c, err = runC(bin, "different")
		if err != nil {
			return fmt.Errorf("c baseline, different CPUs: %w", err)
		}
		diff.CRuns = append(diff.CRuns, c.usPerPage)
		us, st, err = goFault(g, "fault", img, orig, true)
		if err != nil {
			return fmt.Errorf("go handler, different CPUs: %w", err)
		}
		diff.GoRuns = append(diff.GoRuns, us)
		diff.GoFaults = st.Faults
		logf("  rep %d different CPUs: C %6.2f µs/page   Go %6.2f µs/page (%d faults)", i+1, c.usPerPage, us, st.Faults)
		c, err = runC(bin, "unpinned")
		if err != nil {
			return fmt.Errorf("c baseline, unpinned: %w", err)
		}
		fs.CUnpinnedRuns = append(fs.CUnpinnedRuns, c.usPerPage)
		logf("  rep %d unpinned:       C %6.2f µs/page", i+1, c.usPerPage)
	}
	fin := func(p *Placement) {
		p.GoUsPerPage, p.CUsPerPage = median(p.GoRuns), median(p.CRuns)
		p.Ratio = ratio(p.GoUsPerPage, p.CUsPerPage)
	}
	fin(&fs.SameCPU)
	if twoCPUs {
		fin(&diff)
		fs.Different = &diff
		fs.CUnpinned = median(fs.CUnpinnedRuns)
	} else {
		logf("  only one CPU available: different-CPU placement skipped")
	}
	fs.CMemcpyGBps = median(memcpy)
	return nil
}

// storeRead times reading every page of map DefaultMap of snap from the
// store one page per call, as the fault handler does with fault-around 1,
// and returns µs per page.
func storeRead(g *snapshotter.Graph, snap string) (float64, error) {
	mr, err := g.OpenMap(snap, memstore.DefaultMap)
	if err != nil {
		return 0, err
	}
	st := g.Store()
	n := int(mr.Blocks())
	ids := make([]cas.ID, n)
	locs := make([]cas.Location, n)
	for i := range n {
		ids[i] = mr.Block(uint64(i))
		if ids[i] == cas.ZeroID {
			continue
		}
		if locs[i], err = st.Lookup(ids[i]); err != nil {
			return 0, err
		}
	}
	buf := make([]byte, pageSize)
	var rerr error
	d, err := onThread(-1, func() {
		for i := range n {
			if rerr = st.GetLocated(ids[i:i+1], locs[i:i+1], buf); rerr != nil {
				return
			}
		}
	})
	if err := errors.Join(err, rerr); err != nil {
		return 0, err
	}
	return d.Seconds() * 1e6 / float64(n), nil
}

// ---------------------------------------------------------------- part 2

func scatteredRestore(rep *Report, tmp string, orig *unix.CPUSet, cpus []int) error {
	pages := restoreMiB * mib / pageSize
	sr := &rep.Restore
	sr.SnapshotPages, sr.TouchedPages = pages, touchedPages
	// The consumer (and the copy) on CPU 1, the handler, the prefetcher
	// and everything else on CPU 0, as a vCPU thread and its handler would
	// be: cross-CPU wake-ups on every fault, every run.
	cpu := -1
	sr.Placement = "scheduler's choice (one CPU)"
	if len(cpus) >= 2 && slices.Contains(cpus, 1) {
		cpu = 1
		sr.Placement = "consumer on CPU 1; handler, prefetcher and the rest on CPU 0"
	}
	root := filepath.Join(tmp, "restore")
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	defer func() { g.Close(); os.RemoveAll(root) }()
	logf("== part 2: scattered restore, %d MiB snapshot, %d pages touched", restoreMiB, touchedPages)
	img, kinds := guestImage(seed+1, pages, false)
	if _, err := memstore.Capture(context.Background(), g, bytes.NewReader(img), int64(len(img)), memstore.CaptureOptions{Name: "guest"}); err != nil {
		return err
	}
	set := rand.New(rand.NewPCG(seed, 2)).Perm(pages)[:touchedPages]
	for _, p := range set {
		if kinds[p] == kindZero {
			sr.ZeroTouched++
		}
	}
	// The touched pages, back to back: the source of the plain copy.
	packed := make([]byte, touchedPages*pageSize)
	for i, p := range set {
		copy(packed[i*pageSize:], img[p*pageSize:(p+1)*pageSize])
	}

	// restore starts a restore, waits for its prefetch, touches the set and
	// checks the pages it touched.
	type outcome struct {
		start, prefetch, touch time.Duration
		st                     memstore.Stats
		ws                     int
	}
	restore := func(opts memstore.Options, save bool) (outcome, error) {
		var o outcome
		region, err := anon(len(img))
		if err != nil {
			return o, err
		}
		defer func() { _ = unix.Munmap(region) }()
		runtime.GC()
		if cpu >= 0 {
			if err := pinAll(cpuSet(0), -1); err != nil {
				return o, err
			}
			defer func() { _ = pinAll(orig, -1) }()
		}
		t0 := time.Now()
		r, err := memstore.Start(context.Background(), g, "guest", "", region, opts)
		if err != nil {
			return o, err
		}
		o.start = time.Since(t0)
		<-r.PrefetchDone()
		o.prefetch = time.Since(t0)
		d, terr := touch(region, set, cpu)
		o.touch = d
		var serr error
		if save {
			serr = r.SaveWorkingSet()
			o.ws = len(r.WorkingSet())
		}
		cerr := r.Close()
		o.st = r.Stats()
		if err := errors.Join(terr, serr, cerr); err != nil {
			return o, err
		}
		for _, p := range set {
			if !bytes.Equal(region[p*pageSize:(p+1)*pageSize], img[p*pageSize:(p+1)*pageSize]) {
				return o, fmt.Errorf("restored page %d differs from the snapshot", p)
			}
		}
		return o, nil
	}
	fill := func(t *TouchResult, o outcome) {
		t.Runs = append(t.Runs, ms(o.touch))
		t.Faults, t.Copied, t.Zeroed, t.Prefetched = o.st.Faults, o.st.Copied, o.st.Zeroed, o.st.Prefetched
	}
	var starts []float64
	for i := range *reps {
		// (a) no help; the first run also records the working set.
		o, err := restore(memstore.Options{FaultAround: 1, Prefetch: []uint64{}}, i == 0)
		if err != nil {
			return fmt.Errorf("no help: %w", err)
		}
		if i == 0 {
			sr.Prefetch.WorkingSet = o.ws
		}
		fill(&sr.NoHelp, o)
		starts = append(starts, ms(o.start))
		logf("  rep %d no help:          touch %8.2f ms  (%d faults)", i+1, ms(o.touch), o.st.Faults)
		// (b) fault-around 16.
		o, err = restore(memstore.Options{FaultAround: 16, Prefetch: []uint64{}}, false)
		if err != nil {
			return fmt.Errorf("fault-around: %w", err)
		}
		fill(&sr.FaultAround, o)
		starts = append(starts, ms(o.start))
		logf("  rep %d fault-around 16:  touch %8.2f ms  (%d faults)", i+1, ms(o.touch), o.st.Faults)
		// (c) default options: the saved working set is prefetched.
		o, err = restore(memstore.Options{}, false)
		if err != nil {
			return fmt.Errorf("prefetch: %w", err)
		}
		fill(&sr.Prefetch.TouchResult, o)
		sr.Prefetch.PrefetchRuns = append(sr.Prefetch.PrefetchRuns, ms(o.prefetch))
		starts = append(starts, ms(o.start))
		logf("  rep %d prefetch:         touch %8.2f ms  (%d faults, %d prefetched; Start→PrefetchDone %.2f ms)", i+1, ms(o.touch), o.st.Faults, o.st.Prefetched, ms(o.prefetch))
		// (d) a plain copy into fresh anonymous memory.
		dst, err := anon(len(packed))
		if err != nil {
			return err
		}
		runtime.GC()
		d, err := onThread(cpu, func() { copy(dst, packed) })
		_ = unix.Munmap(dst)
		if err != nil {
			return err
		}
		sr.CopyRuns = append(sr.CopyRuns, ms(d))
		logf("  rep %d copy 32 MiB:      %8.2f ms", i+1, ms(d))
	}
	sr.StartMs = median(starts)
	sr.CopyMs = median(sr.CopyRuns)
	for _, t := range []*TouchResult{&sr.NoHelp, &sr.FaultAround, &sr.Prefetch.TouchResult} {
		t.Ms = median(t.Runs)
		t.VsCopy = ratio(t.Ms, sr.CopyMs)
	}
	sr.Prefetch.PrefetchMs = median(sr.Prefetch.PrefetchRuns)
	sr.Prefetch.PrefetchVsCopy = ratio(sr.Prefetch.PrefetchMs, sr.CopyMs)
	return nil
}

// ---------------------------------------------------------------- part 3

// countingReader is a bytes.Reader that counts the pages read through it.
type countingReader struct {
	r     *bytes.Reader
	bytes atomic.Int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.r.ReadAt(p, off)
	c.bytes.Add(int64(n))
	return n, err
}

func captureBench(rep *Report, tmp string) error {
	pages := captureMiB * mib / pageSize
	cr := &rep.Capture
	cr.RegionBytes = int64(pages) * pageSize
	logf("== part 3: capture of %d MiB, full and with %.0f%% of the pages dirty", captureMiB, dirtyFrac*100)
	img, _ := guestImage(seed+2, pages, false)
	// The changed memory: 10% of the pages, scattered, rewritten with new
	// random bytes or text.
	next := bytes.Clone(img)
	r := rand.New(rand.NewPCG(seed, 3))
	var key [32]byte
	for i := range key {
		key[i] = byte(r.Uint32())
	}
	c := rand.NewChaCha8(key)
	ndirty := int(float64(pages) * dirtyFrac)
	dirty := memstore.NewBitmap(pages)
	for _, p := range r.Perm(pages)[:ndirty] {
		dirty.Set(p)
		fillPage(next[p*pageSize:(p+1)*pageSize], kindRandom+r.IntN(2), r, c, -p)
	}
	cr.DirtyPages = dirty.Count()
	var full, dirt, again []float64
	// capture times one capture into g and returns its seconds, new
	// chunks and pages read.
	capture := func(g *snapshotter.Graph, src []byte, opts memstore.CaptureOptions) (float64, int64, int, error) {
		runtime.GC()
		rd := &countingReader{r: bytes.NewReader(src)}
		t0 := time.Now()
		s, err := memstore.Capture(context.Background(), g, rd, int64(len(src)), opts)
		d := time.Since(t0).Seconds()
		if err != nil {
			return 0, 0, 0, fmt.Errorf("capturing %s: %w", opts.Name, err)
		}
		m, _ := s.Map(memstore.DefaultMap)
		return d, m.NewChunks, int(rd.bytes.Load() / pageSize), nil
	}
	// Each repetition uses two fresh stores, so that no capture finds the
	// changed pages stored already: one for the full capture and the
	// dirty-bitmap capture, one for a second full capture and the changed
	// memory captured in full with the parent set.
	for i := range *reps {
		err := withGraph(filepath.Join(tmp, fmt.Sprintf("capture-%d-a", i)), func(g *snapshotter.Graph) error {
			d, nc, rp, err := capture(g, img, memstore.CaptureOptions{Name: "base"})
			if err != nil {
				return err
			}
			full = append(full, d)
			cr.Full.NewChunks, cr.Full.ReadPages = nc, rp
			logf("  rep %d full:                  %6.3f s  (%d new chunks)", i+1, d, nc)
			d, nc, rp, err = capture(g, next, memstore.CaptureOptions{Name: "dirty", Parent: "base", Dirty: dirty})
			if err != nil {
				return err
			}
			dirt = append(dirt, d)
			cr.Dirty.NewChunks, cr.Dirty.ReadPages = nc, rp
			logf("  rep %d dirty bitmap:          %6.3f s  (%d new chunks, %d pages read)", i+1, d, nc, rp)
			if i == 0 {
				return verifySnapshot(g, "dirty", next)
			}
			return nil
		})
		if err == nil {
			err = withGraph(filepath.Join(tmp, fmt.Sprintf("capture-%d-b", i)), func(g *snapshotter.Graph) error {
				d, nc, _, err := capture(g, img, memstore.CaptureOptions{Name: "base"})
				if err != nil {
					return err
				}
				full = append(full, d)
				logf("  rep %d full:                  %6.3f s  (%d new chunks)", i+1, d, nc)
				d, nc, rp, err := capture(g, next, memstore.CaptureOptions{Name: "again", Parent: "base"})
				if err != nil {
					return err
				}
				again = append(again, d)
				cr.Recapture.NewChunks, cr.Recapture.ReadPages = nc, rp
				logf("  rep %d full, parent set:      %6.3f s  (%d new chunks)", i+1, d, nc)
				return nil
			})
		}
		if err != nil {
			return err
		}
	}
	region := float64(cr.RegionBytes) / 1e6
	for _, x := range []struct {
		c    *CaptureRun
		runs []float64
	}{{&cr.Full, full}, {&cr.Dirty, dirt}, {&cr.Recapture, again}} {
		x.c.Runs = x.runs
		x.c.Seconds = median(x.runs)
		x.c.RegionMBps = region / x.c.Seconds
	}
	cr.Dirty.DirtyMBps = float64(cr.DirtyPages) * pageSize / 1e6 / cr.Dirty.Seconds
	return nil
}

// withGraph opens a fresh graph at root, runs f, and removes the root.
func withGraph(root string, f func(*snapshotter.Graph) error) error {
	defer os.RemoveAll(root)
	g, err := snapshotter.Open(root)
	if err != nil {
		return err
	}
	err = f(g)
	return errors.Join(err, g.Close())
}

// verifySnapshot restores snap and checks it holds want.
func verifySnapshot(g *snapshotter.Graph, snap string, want []byte) error {
	region, err := anon(len(want))
	if err != nil {
		return err
	}
	defer func() { _ = unix.Munmap(region) }()
	r, err := memstore.Start(context.Background(), g, snap, "", region, memstore.Options{FaultAround: 64, Prefetch: []uint64{}})
	if err != nil {
		return err
	}
	_, terr := touch(region, nil, -1)
	if err := errors.Join(terr, r.Close()); err != nil {
		return err
	}
	if !bytes.Equal(region, want) {
		return fmt.Errorf("snapshot %s differs from the memory it captured", snap)
	}
	return nil
}

// ---------------------------------------------------------------- summary

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

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
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
		fmt.Fprintf(w, "   %-44s %10s %10s %8s\n", "placement", "Go µs/pg", "C µs/pg", "Go/C")
		row := func(name string, p Placement) {
			fmt.Fprintf(w, "   %-44s %10.2f %10.2f %7.2fx\n", name, p.GoUsPerPage, p.CUsPerPage, p.Ratio)
		}
		row("same CPU (everything on CPU 0)", fs.SameCPU)
		if fs.Different != nil {
			row("different CPUs (toucher 1, handler 0)", *fs.Different)
			fmt.Fprintf(w, "   %-44s %10s %10.2f   runs %s\n", "C, taskset -c 0,1 (scheduler's choice)", "", fs.CUnpinned, runs(fs.CUnpinnedRuns, "%.1f"))
		}
		fmt.Fprintf(w, "   Go faults served per run: %d of %d pages; C memcpy %.2f GB/s\n", fs.SameCPU.GoFaults, fs.Pages, fs.CMemcpyGBps)
		fmt.Fprintf(w, "   reading one page from the store alone (GetLocated: pread, s2 decode, SHA-256): %.2f µs\n\n", fs.StoreReadUs)
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
