package agent

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReaper runs commands through a Reaper while the test process stands in for PID 1 (a child subreaper, so
// orphans come to it): every command still gets its own exit status, and orphans do not stay zombies.
func TestReaper(t *testing.T) {
	c := serve(t, &ServerConfig{Reaper: subreaper(t)})

	// An orphan comes to this process, and is reaped when it exits.
	code, err := c.Run(testCtx(t), Command{Shell: "(exec sleep 1.001 >/dev/null 2>&1 &); exit 0"})
	if err != nil || code != 0 {
		t.Fatalf("code %d, err %v", code, err)
	}
	if kids := children(t, "sleep 1.001"); len(kids) != 1 || strings.HasSuffix(kids[0], " Z") {
		t.Fatalf("children %v; want the orphaned sleep, alive", kids)
	}

	var wg sync.WaitGroup
	for i := range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each leaves an orphan behind, which comes to this process when its shell exits.
			code, err := c.Run(testCtx(t), Command{Shell: fmt.Sprintf("(exec sleep 0.101 >/dev/null 2>&1 &); exit %d", i%7)})
			if err != nil || code != i%7 {
				t.Errorf("command %d: code %d, err %v; want %d", i, code, err, i%7)
			}
		}()
	}
	wg.Wait()

	// The orphans exit and are reaped: no zombie stays, and none of them is left.
	deadline := time.Now().Add(10 * time.Second)
	for {
		zombies := children(t, "")
		kept := zombies[:0]
		for _, z := range zombies {
			if strings.HasSuffix(z, " Z") {
				kept = append(kept, z)
			}
		}
		orphans := append(children(t, "sleep 0.101"), children(t, "sleep 1.001")...)
		if len(kept) == 0 && len(orphans) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("zombies %v and orphans %v left", kept, orphans)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// children returns "pid state" for each child of this process whose command line is cmdline (any, if empty).
func children(t *testing.T, cmdline string) []string {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	me := strconv.Itoa(os.Getpid())
	var out []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces, so read after the last ')'.
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) < 2 || f[1] != me {
			continue
		}
		if cmdline != "" {
			cl, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil || strings.TrimRight(strings.ReplaceAll(string(cl), "\x00", " "), " ") != cmdline {
				continue
			}
		}
		out = append(out, e.Name()+" "+f[0])
	}
	return out
}

// subreaper makes the test process a child subreaper, as PID 1 stands for
// orphans, and runs a Reaper until t ends.
func subreaper(t *testing.T) *Reaper {
	t.Helper()
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("cannot become a child subreaper (PR_SET_CHILD_SUBREAPER): %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := NewReaper()
	reaperDone := make(chan struct{})
	go func() {
		defer close(reaperDone)
		r.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-reaperDone
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	})
	return r
}
