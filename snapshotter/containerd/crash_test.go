package containerd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// The crash tests run Commit in a child process (this test binary, told by
// the environment) and kill it with SIGKILL.
const (
	envCrashRoot = "BOXD_CTD_CRASH_ROOT"
	envCrashKey  = "BOXD_CTD_CRASH_KEY"
	envCrashName = "BOXD_CTD_CRASH_NAME"
	envCrashAt   = "BOXD_CTD_CRASH_AT"
)

func TestMain(m *testing.M) {
	if root := os.Getenv(envCrashRoot); root != "" {
		os.Exit(commitChild(root))
	}
	os.Exit(m.Run())
}

// commitChild commits and exits, or kills itself at the crash point named.
func commitChild(root string) int {
	s, _, cleanup, err := open(root)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cleanup()
	if at := os.Getenv(envCrashAt); at != "" {
		crashPoint = func(p string) {
			if p == at {
				_ = unix.Kill(unix.Getpid(), unix.SIGKILL)
				select {}
			}
		}
	}
	fmt.Println("committing")
	if err := s.Commit(context.Background(), os.Getenv(envCrashName), os.Getenv(envCrashKey)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// runCommit commits key as name in a child process; at names a crash point,
// or kill, when positive, is how long after the commit starts to kill it.
// It reports whether the child was killed.
func runCommit(t *testing.T, root, key, name, at string, kill time.Duration) bool {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envCrashRoot+"="+root, envCrashKey+"="+key, envCrashName+"="+name, envCrashAt+"="+at)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "committing\n" {
		_ = cmd.Wait()
		t.Fatalf("child: %q, %s", line, stderr.String())
	}
	if kill > 0 {
		time.Sleep(kill)
		_ = cmd.Process.Signal(syscall.SIGKILL)
	}
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	if err != nil {
		t.Fatalf("child: %v: %s", err, stderr.String())
	}
	return false
}

// checkAfterCrash checks that exactly one of active key and committed name
// exists, with the files written; it returns whether the commit happened.
func checkAfterCrash(t *testing.T, root, key, name string, files map[string][]byte) bool {
	t.Helper()
	ctx := context.Background()
	s, g, cleanup, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	ai, aerr := s.Stat(ctx, key)
	ci, cerr := s.Stat(ctx, name)
	switch {
	case aerr == nil && errdefs.IsNotFound(cerr):
		if ai.Kind != snapshots.KindActive {
			t.Fatalf("%s is %v", key, ai.Kind)
		}
		ms, err := s.Mounts(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, ms, files)
	case cerr == nil && errdefs.IsNotFound(aerr):
		if ci.Kind != snapshots.KindCommitted {
			t.Fatalf("%s is %v", name, ci.Kind)
		}
		ms, err := s.View(ctx, name+"-check", name)
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, ms, files)
		if err := s.Remove(ctx, name+"-check"); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("after a crash: active %q: %v; committed %q: %v", key, aerr, name, cerr)
	}
	if err := s.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	// Every graph snapshot of the snapshotter is a committed snapshot's;
	// every image an active snapshot's or a view's.
	all, err := g.List()
	if err != nil {
		t.Fatal(err)
	}
	var committed, images int
	if err := s.Walk(ctx, func(_ context.Context, si snapshots.Info) error {
		if si.Kind == snapshots.KindCommitted {
			committed++
		} else {
			images++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	ours := 0
	for _, snap := range all {
		if s.ownsGraphName(snap.Name) {
			ours++
		}
	}
	entries, err := os.ReadDir(s.images)
	if err != nil {
		t.Fatal(err)
	}
	if ours != committed || len(entries) != images {
		t.Fatalf("after Cleanup: %d graph snapshots for %d committed, %d image files for %d active and views", ours, committed, len(entries), images)
	}
	return cerr == nil
}

// prepareFiles makes active snapshot key over parent holding files and
// closes the snapshotter.
func prepareFiles(t *testing.T, root, key, parent string, files map[string][]byte) {
	t.Helper()
	s, _, cleanup, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	ms, err := s.Prepare(context.Background(), key, parent, sizeLabel(256<<20))
	if err != nil {
		t.Fatal(err)
	}
	writeFiles(t, ms, files)
}

// TestCommitCrashPoints: a kill -9 just after the graph snapshot is written
// leaves the active snapshot, and just after the records commit the
// committed one; Cleanup removes what either leaves behind.
func TestCommitCrashPoints(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	files := map[string][]byte{"f": randomData(7, 2<<20)}
	prepareFiles(t, root, "a", "", files)

	if !runCommit(t, root, "a", "c", "graph-committed", 0) {
		t.Fatal("the child was not killed")
	}
	leftover(t, root, func(s *Snapshotter, g *snapshotter.Graph) {
		if _, err := g.Get(s.graphName("1")); err != nil {
			t.Errorf("no graph snapshot after a crash past its commit: %v", err)
		}
	})
	if checkAfterCrash(t, root, "a", "c", files) {
		t.Fatal("killed before its records committed, the commit happened")
	}
	if !runCommit(t, root, "a", "c", "metadata-committed", 0) {
		t.Fatal("the child was not killed")
	}
	leftover(t, root, func(s *Snapshotter, _ *snapshotter.Graph) {
		if _, err := os.Stat(s.imagePath("1")); err != nil {
			t.Errorf("no image after a crash before its removal: %v", err)
		}
	})
	if !checkAfterCrash(t, root, "a", "c", files) {
		t.Fatal("killed after its records committed, the commit did not happen")
	}
}

// leftover opens the snapshotter under root for fn to look at.
func leftover(t *testing.T, root string, fn func(*Snapshotter, *snapshotter.Graph)) {
	t.Helper()
	s, g, cleanup, err := open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	fn(s, g)
}

// TestCommitKilled kills Commit at random moments.
func TestCommitKilled(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	r := rand.New(rand.NewPCG(8, 8))
	files := map[string][]byte{}
	parent := ""
	kills := 0
	for i := range 5 {
		files[fmt.Sprintf("f%d", i)] = randomData(uint64(100+i), 24<<20)
		key, name := fmt.Sprintf("a%d", i), fmt.Sprintf("c%d", i)
		prepareFiles(t, root, key, parent, map[string][]byte{fmt.Sprintf("f%d", i): files[fmt.Sprintf("f%d", i)]})
		delay := time.Duration(1+r.IntN(250)) * time.Millisecond
		killed := runCommit(t, root, key, name, "", delay)
		done := checkAfterCrash(t, root, key, name, files)
		t.Logf("killed %v after %v: committed %v", killed, delay, done)
		if killed {
			kills++
		}
		if !done {
			if runCommit(t, root, key, name, "", 0) {
				t.Fatal("the child was killed")
			}
			if !checkAfterCrash(t, root, key, name, files) {
				t.Fatal("a retried commit did not happen")
			}
		}
		parent = name
	}
	if kills == 0 {
		t.Error("no commit was killed: the commits are faster than the delays")
	}
}
