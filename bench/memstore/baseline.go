package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"golang.org/x/sys/unix"
)

// buildBaseline builds the C baseline (-baseline) into dir and returns the
// binary.
func buildBaseline(dir string) (string, error) {
	src := *baseline
	if !filepath.IsAbs(src) {
		src = filepath.Join(repoRoot(), src)
	}
	bin := filepath.Join(dir, "uffd_baseline")
	benchkit.Progress("== building the C baseline: gcc -O2 -pthread -o %s %s", bin, src)
	if out, err := exec.Command("gcc", "-O2", "-pthread", "-o", bin, src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the C baseline: %w\n%s", err, out)
	}
	return bin, nil
}

type cResult struct {
	usPerPage, memcpyGBps float64
	// cpuUsPerPage is the CPU time of the baseline's whole process (both
	// threads) while the pages were touched, per page; 0 when the baseline
	// does not report it.
	cpuUsPerPage float64
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
		case "cpu_us_per_page":
			r.cpuUsPerPage, _ = strconv.ParseFloat(v, 64)
		case "memcpy_gbps":
			r.memcpyGBps, _ = strconv.ParseFloat(v, 64)
		}
	}
	if pages != faultMiB*mib/pageSize || r.usPerPage <= 0 {
		return cResult{}, fmt.Errorf("unexpected baseline output: %q", out.String())
	}
	return r, nil
}
