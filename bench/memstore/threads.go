// Threads and CPUs: the measured code runs on threads of its own, pinned
// to the CPUs each placement names.

package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// cpuList is the CPUs in s.
func cpuList(s *unix.CPUSet) []int {
	var out []int
	for i := range 1024 {
		if s.IsSet(i) {
			out = append(out, i)
		}
	}
	return out
}

// cpuSet is the set of cpus.
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

// anon maps size bytes of private anonymous memory.
func anon(size int) ([]byte, error) {
	return unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
}
