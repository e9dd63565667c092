package main

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// env is what the measurements share: the CPUs this process may use, a
// temporary folder for the stores, and the C baseline built in it.
type env struct {
	orig unix.CPUSet // the affinity the process started with
	cpus []int       // the CPUs in orig
	tmp  string      // removed by tearDown, or on a signal
	bin  string      // the C baseline
	done chan struct{}
}

// setUp checks the tools and CPUs the run needs, makes the temporary
// folder and builds the C baseline there. The env it returns must be torn
// down.
func setUp(ctx context.Context) (*env, error) {
	for _, tool := range []string{"gcc", "taskset"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("missing tool: %s", tool)
		}
	}
	e := &env{done: make(chan struct{})}
	if err := unix.SchedGetaffinity(0, &e.orig); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	e.cpus = cpuList(&e.orig)
	if len(e.cpus) == 0 || !slices.Contains(e.cpus, 0) {
		return nil, fmt.Errorf("CPU 0 is not available to this process (affinity %v)", e.cpus)
	}
	tmp, err := os.MkdirTemp("", "boxd-memstore-bench-")
	if err != nil {
		return nil, err
	}
	e.tmp = tmp
	// The measurements do not stop midway (a thread blocked in a fault
	// waits for its handler), so a signal ends the run at once: the
	// folder goes here, and the process with it.
	go func() {
		<-ctx.Done()
		select {
		case <-e.done: // the run has ended
		default:
			os.RemoveAll(tmp)
			os.Exit(130)
		}
	}()
	if e.bin, err = buildBaseline(tmp); err != nil {
		e.tearDown()
		return nil, err
	}
	return e, nil
}

// tearDown removes the temporary folder.
func (e *env) tearDown() {
	close(e.done)
	os.RemoveAll(e.tmp)
}

// twoCPUs says whether CPU 1 is there besides CPU 0, for the different-CPU
// placements.
func (e *env) twoCPUs() bool {
	return len(e.cpus) >= 2 && slices.Contains(e.cpus, 1)
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
