package integration

// TestBox boots real Linux boxes under QEMU (TCG on hosts without
// hardware virtualisation) from the default Debian image, talks to them
// through boxd's agent, and forks and hibernates them.

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// boxEnv is a manager over a fresh root with the default image built.
type boxEnv struct {
	root string
	g    *snapshotter.Graph
	mgr  *box.Manager
	bk   *backends.Set
}

func newBoxEnv(ctx context.Context, t *testing.T) *boxEnv {
	t.Helper()
	return newBoxEnvOn(ctx, t, nil)
}

// newBoxEnvOn is newBoxEnv, with prepare called on the fresh root before
// the store is opened in it.
func newBoxEnvOn(ctx context.Context, t *testing.T, prepare func(root string)) *boxEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("boots Linux boxes under QEMU; skipped with -short")
	}
	ensurePackages(t, "qemu-system-x86", "qemu-utils", "debootstrap", "e2fsprogs")
	tree := debootstrapRootfs(t)
	root := t.TempDir()
	agentBin := filepath.Join(root, "boxd-agent")
	build := exec.CommandContext(ctx, "go", "build", "-o", agentBin, "github.com/boxd-dev/boxd/cmd/boxd-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building boxd-agent: %v\n%s", err, out)
	}
	t.Setenv(guest.AgentEnv, agentBin)
	if prepare != nil {
		prepare(root)
	}
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	start := time.Now()
	if _, err := guest.BuildImage(ctx, g, guest.BuildOptions{Tree: tree, Size: 2 << 30}); err != nil {
		t.Fatalf("building the default image: %v", err)
	}
	t.Logf("default image built from the cached tree in %v", time.Since(start).Round(time.Millisecond))
	bk := backends.New(backends.Config{Root: root, Graph: g})
	mgr, err := box.Open(box.Config{Root: root, Graph: g, Runners: bk.Runners, DefaultRunner: backends.Default})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		boxes, _ := mgr.List()
		for _, b := range boxes {
			_, _ = mgr.Stop(context.Background(), b.Name)
		}
		_ = mgr.Close(context.Background())
		_ = bk.Close(context.Background())
	})
	return &boxEnv{root: root, g: g, mgr: mgr, bk: bk}
}

// run runs a shell line in box name and returns its stdout, failing the
// test unless it exits with want.
func (e *boxEnv) run(ctx context.Context, t *testing.T, name, line string, want int) string {
	t.Helper()
	var out, errb bytes.Buffer
	code, err := e.mgr.Exec(ctx, name, agent.Command{Shell: line, Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("%s: %q: %v", name, line, err)
	}
	if code != want {
		t.Fatalf("%s: %q exited %d, want %d; stderr: %s", name, line, code, want, errb.String())
	}
	return strings.TrimSpace(out.String())
}

func TestBoxLinux(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := newBoxEnv(ctx, t)

	start := time.Now()
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("box dev: created and its agent answered in %v", time.Since(start).Round(time.Millisecond))

	// The guest's kernel, not the host's.
	_, modules, err := guest.Kernel(ctx, e.root, "")
	if err != nil {
		t.Fatal(err)
	}
	host, _ := exec.Command("uname", "-r").Output()
	if got := e.run(ctx, t, "dev", "uname -r", 0); got != filepath.Base(modules) || got == strings.TrimSpace(string(host)) {
		t.Fatalf("uname -r in the box = %q; want the guest kernel %q (host %q)", got, filepath.Base(modules), host)
	}
	if got := e.run(ctx, t, "dev", "cat /etc/os-release", 0); !strings.Contains(got, "bookworm") {
		t.Fatalf("/etc/os-release: %s", got)
	}
	if got := e.run(ctx, t, "dev", "hostname", 0); got != "dev" {
		t.Fatalf("hostname = %q, want dev", got)
	}
	// A pty.
	var out bytes.Buffer
	code, err := e.mgr.Exec(ctx, "dev", agent.Command{Shell: "tty", TTY: true, Stdout: &out})
	if err != nil || code != 0 || !strings.HasPrefix(strings.TrimSpace(out.String()), "/dev/pts/") {
		t.Fatalf("tty on a pty: %d %v %q", code, err, out.String())
	}
	e.run(ctx, t, "dev", "exit 3", 3)
	var errb bytes.Buffer
	code, err = e.mgr.Exec(ctx, "dev", agent.Command{Args: []string{"no-such-command"}, Stderr: &errb})
	if err != nil || code != 127 || !strings.Contains(errb.String(), "not found") {
		t.Fatalf("a missing command: exit %d, %v, stderr %q; want 127 and 'not found'", code, err, errb.String())
	}

	// The disk persists across a stop and a cold boot.
	e.run(ctx, t, "dev", "echo kept > /root/file && sync", 0)
	if _, err := e.mgr.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Start(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if got := e.run(ctx, t, "dev", "cat /root/file", 0); got != "kept" {
		t.Fatalf("after a restart /root/file = %q", got)
	}

	// Pause and resume.
	if _, err := e.mgr.Pause(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if b, _ := e.mgr.Get("dev"); b.State != box.StatePaused {
		t.Fatalf("state after pause: %s", b.State)
	}
	if _, err := e.mgr.Unpause(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "dev", "true", 0)

	// The CPU time a box's machine uses, which idle hibernation reads,
	// grows with the work the guest does: two seconds idle against two
	// seconds of a busy loop.
	t0, ok := e.mgr.CPUTime("dev")
	if !ok || t0 <= 0 {
		t.Fatalf("CPUTime of a running box: %v, %v", t0, ok)
	}
	time.Sleep(2 * time.Second)
	t1, _ := e.mgr.CPUTime("dev")
	e.run(ctx, t, "dev", "end=$(($(date +%s)+2)); while [ $(date +%s) -lt $end ]; do :; done", 0)
	t2, _ := e.mgr.CPUTime("dev")
	idle, busy := t1-t0, t2-t1
	t.Logf("CPU time of the box's QEMU: %v in two idle seconds, %v in a two-second busy loop", idle, busy)
	if busy < 250*time.Millisecond || busy < 3*idle {
		t.Fatalf("a two-second busy loop in the guest added %v of CPU time; two idle seconds %v", busy, idle)
	}
	if _, err := e.mgr.Stop(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.mgr.CPUTime("dev"); ok {
		t.Fatal("CPUTime of a stopped box")
	}
}

// counter is a process that appends a growing count to a file in /tmp
// (RAM) five times a second.
const counter = `nohup sh -c 'i=0; while :; do echo $i >> /tmp/count; i=$((i+1)); sleep 0.2; done' >/dev/null 2>&1 &`

// lastCount is the last number in box name's /tmp/count.
func (e *boxEnv) lastCount(ctx context.Context, t *testing.T, name string) int {
	t.Helper()
	n, err := strconv.Atoi(e.run(ctx, t, name, "tail -n 1 /tmp/count", 0))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// storeBytes is what the store's packs hold.
func (e *boxEnv) storeBytes(ctx context.Context, t *testing.T) int64 {
	t.Helper()
	r, err := e.g.Report(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return r.Store.PackBytes
}

func TestBoxForkHibernate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := newBoxEnv(ctx, t)
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev"}); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "dev", counter, 0)
	e.run(ctx, t, "dev", "echo parent > /root/parent.txt && sleep 1", 0)
	before := e.lastCount(ctx, t, "dev")

	storeBefore := e.storeBytes(ctx, t)
	start := time.Now()
	if _, err := e.mgr.Fork(ctx, "dev", []string{"a", "b"}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start).Round(time.Millisecond)
	// The fork's snapshot goes to the store after the fork returns.
	if err := e.mgr.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("fork of dev into a and b, agents answering: %v; store grew %d KiB", took, (e.storeBytes(ctx, t)-storeBefore)>>10)

	ids := map[string]string{}
	hosts := map[string]string{}
	rnd := map[string]string{}
	for _, n := range []string{"dev", "a", "b"} {
		// One line, so that the random bytes are read as soon as the
		// box is reached.
		sent := float64(time.Now().UnixNano()) / 1e9
		got := e.run(ctx, t, n, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; echo $(cat /etc/machine-id); date +%s.%N; cat /root/parent.txt", 0)
		answered := float64(time.Now().UnixNano()) / 1e9
		lines := strings.Split(got, "\n")
		if len(lines) != 5 {
			t.Fatalf("%s: %q", n, got)
		}
		rnd[n], hosts[n], ids[n] = lines[0], lines[1], lines[2]
		guestClock, _ := strconv.ParseFloat(lines[3], 64)
		// The guest read its clock between the host's sending the command
		// and getting the answer.
		if guestClock < sent-1 || guestClock > answered+1 {
			t.Fatalf("%s: guest clock %.3f, host %.3f to %.3f: more than a second apart", n, guestClock, sent, answered)
		}
		if lines[4] != "parent" {
			t.Fatalf("%s: the parent's file reads %q", n, lines[4])
		}
		// The counter runs on from where it was, in each box.
		time.Sleep(500 * time.Millisecond)
		if c := e.lastCount(ctx, t, n); c <= before {
			t.Fatalf("%s: counter at %d, it was %d before the fork", n, c, before)
		}
		if first := e.run(ctx, t, n, "head -n 1 /tmp/count", 0); first != "0" {
			t.Fatalf("%s: /tmp/count starts at %q: the process is not the one from before the fork", n, first)
		}
	}
	if hosts["a"] != "a" || hosts["b"] != "b" || hosts["dev"] != "dev" {
		t.Fatalf("hostnames: %v", hosts)
	}
	if ids["a"] == ids["b"] || ids["a"] == ids["dev"] || ids["b"] == ids["dev"] {
		t.Fatalf("machine-ids are not unique: %v", ids)
	}
	if rnd["a"] == rnd["b"] || rnd["a"] == rnd["dev"] {
		t.Fatalf("random bytes repeat across forks: %v", rnd)
	}

	// Forks diverge.
	e.run(ctx, t, "a", "echo mine > /root/a.txt", 0)
	e.run(ctx, t, "b", "test ! -e /root/a.txt", 0)
	e.run(ctx, t, "dev", "test ! -e /root/a.txt", 0)

	// A fork of a fork stores about what changed.
	storeBefore = e.storeBytes(ctx, t)
	if _, err := e.mgr.Fork(ctx, "a", []string{"a2"}); err != nil {
		t.Fatal(err)
	}
	if err := e.mgr.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	grew := e.storeBytes(ctx, t) - storeBefore
	t.Logf("second fork: store grew %d KiB for a 512 MiB box", grew>>10)
	if grew > 64<<20 {
		t.Fatalf("a fork of a running fork stored %d MiB: more than what changed", grew>>20)
	}
	e.run(ctx, t, "a2", "cat /root/a.txt", 0)

	// Hibernate and resume: the process is still there.
	atHibernate := e.lastCount(ctx, t, "b")
	start = time.Now()
	if _, err := e.mgr.Hibernate(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	t.Logf("hibernate of b: %v", time.Since(start).Round(time.Millisecond))
	if bx, _ := e.mgr.Get("b"); bx.State != box.StateHibernated {
		t.Fatalf("b is %s after hibernate", bx.State)
	}
	start = time.Now()
	if _, err := e.mgr.Resume(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	t.Logf("resume of b to its agent answering: %v", time.Since(start).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond)
	if c := e.lastCount(ctx, t, "b"); c <= atHibernate {
		t.Fatalf("b's counter at %d after resume, %d at hibernate", c, atHibernate)
	}

	// kill -9 of QEMU during a snapshot leaves the previous snapshot whole.
	// (Its memory all in place first: a QEMU that dies before is a resume
	// that did not finish, which leaves the box hibernated, as the
	// lazy-restore tests check.)
	if err := e.bk.QEMU.AwaitRestores(ctx); err != nil {
		t.Fatalf("b's memory after its resume: %v", err)
	}
	bx, _ := e.mgr.Get("b")
	prev := bx.Snapshot
	pids, _ := exec.Command("pgrep", "-f", bx.Disk).Output()
	pid, err := strconv.Atoi(strings.Fields(string(pids) + " x")[0])
	if err != nil {
		t.Fatalf("no QEMU for box b (disk %s): %q", bx.Disk, pids)
	}
	go func() {
		time.Sleep(150 * time.Millisecond)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}()
	if _, err := e.mgr.Snapshot(ctx, "b", "killed"); err == nil {
		t.Log("the snapshot finished before QEMU was killed")
	} else {
		t.Logf("snapshot with QEMU killed: %v", err)
	}
	if res, err := e.g.Verify(ctx, nil); err != nil || !res.OK() {
		t.Fatalf("the store after the kill: %v %+v", err, res)
	}
	if _, err := e.g.Get(prev); err != nil {
		t.Fatalf("the snapshot before the kill: %v", err)
	}
	// The box whose QEMU died is reported stopped, saying so.
	for {
		bx, err := e.mgr.Get("b")
		if err != nil {
			t.Fatal(err)
		}
		if bx.State == box.StateStopped && strings.Contains(bx.Note, "exited") {
			t.Logf("b after its QEMU was killed: %s (%s)", bx.State, bx.Note)
			break
		}
		if bx.State == box.StateRunning && ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		t.Fatalf("b after its QEMU was killed: %s (%s)", bx.State, bx.Note)
	}

	// A hibernated box whose snapshot lost data does not resume (or, its
	// memory served lazily, stops when it meets the damage), says which
	// chunk, and stays hibernated; once the pack is repaired it resumes;
	// other boxes are unaffected.
	e.run(ctx, t, "a2", "head -c 8000000 /dev/urandom > /tmp/noise", 0)
	if err := e.mgr.Flush(ctx); err != nil { // nothing else lands in the newest pack
		t.Fatal(err)
	}
	if _, err := e.mgr.Hibernate(ctx, "a2"); err != nil {
		t.Fatal(err)
	}
	pack, whole := newestPack(t, e.root)
	damageNewestPack(t, e.root)
	why := ""
	if _, err := e.mgr.Resume(ctx, "a2"); err != nil {
		if !errors.Is(err, errdefs.ErrDataLoss) {
			t.Fatalf("resume from a damaged snapshot: %v, want errdefs.ErrDataLoss", err)
		}
		why = err.Error()
	} else {
		why = waitHibernated(ctx, t, e, "a2")
	}
	t.Logf("resume from a damaged snapshot: %s", why)
	if !strings.Contains(why, "chunk sha256:") {
		t.Fatalf("a failed resume from a damaged snapshot names no chunk: %s", why)
	}
	if bx, _ := e.mgr.Get("a2"); bx.State != box.StateHibernated {
		t.Fatalf("a2 is %s after a failed resume", bx.State)
	}
	if err := os.WriteFile(pack, whole, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Resume(ctx, "a2"); err != nil {
		t.Fatalf("resume once the damaged pack is repaired: %v", err)
	}
	e.run(ctx, t, "a2", "test $(wc -c < /tmp/noise) = 8000000", 0)
	if _, err := e.mgr.Hibernate(ctx, "a2"); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "dev", "cat /root/parent.txt", 0)

	// Bad input.
	if _, err := e.mgr.Fork(ctx, "nope", []string{"x"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("fork of a missing box: %v", err)
	}
	if _, err := e.mgr.Stop(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Fork(ctx, "a", []string{"y"}); !errors.Is(err, box.ErrInvalidState) {
		t.Fatalf("fork of a stopped box: %v", err)
	}
	if _, err := e.mgr.Hibernate(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("hibernate of a missing box: %v", err)
	}
	if _, err := e.mgr.Fork(ctx, "dev", []string{"Bad_Name"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("fork to a bad name: %v", err)
	}

	// Removing a box keeps what its forks stand on: b runs on dev's frozen
	// disk overlay, and hibernates and resumes through dev's snapshots.
	if err := e.mgr.Remove(ctx, "dev"); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "b", "cat /root/parent.txt", 0)
	if _, err := e.mgr.Hibernate(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Resume(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "b", "cat /root/parent.txt", 0)
	// Once every box is gone, nothing of theirs is left but chunks for gc.
	for _, n := range []string{"a", "a2", "b"} {
		if err := e.mgr.Remove(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	snaps, err := e.g.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, "box.") {
			t.Errorf("snapshot %s outlived its boxes", s.Name)
		}
	}
	if left, _ := filepath.Glob(filepath.Join(e.root, "disks", "*")); len(left) != 0 {
		t.Errorf("disk files outlived their boxes: %v", left)
	}
	if left := e.bk.QEMU.FrozenFiles(); len(left) != 0 {
		t.Errorf("frozen memory outlived its boxes: %v", left)
	}
}

// TestBoxHibernateDiskFull hibernates a box while the store's file system
// is full: the hibernate fails saying so and the box runs on; once there
// is room, it hibernates and resumes with its process and every page it
// changed meanwhile.
func TestBoxHibernateDiskFull(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var casDir string
	e := newBoxEnvOn(ctx, t, func(root string) {
		// The store alone on a small file system (the disks stay on the
		// test's: a guest whose disk is full is paused by QEMU).
		casDir = filepath.Join(root, "cas")
		if err := os.MkdirAll(casDir, 0o700); err != nil {
			t.Fatal(err)
		}
		testutil.MountTmpfs(t, casDir, "size=640m")
	})
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "full", Memory: 256 << 20}); err != nil {
		t.Fatal(err)
	}
	e.run(ctx, t, "full", counter, 0)
	// Memory the snapshot must store: 16 MiB the guest has not shown yet.
	e.run(ctx, t, "full", "head -c 16000000 /dev/urandom > /tmp/noise; md5sum /tmp/noise > /tmp/noise.md5", 0)

	filler := filepath.Join(casDir, "filler")
	fill(t, filler)
	_, err := e.mgr.Hibernate(ctx, "full")
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("hibernate with the store's disk full: %v, want errdefs.ErrResourceExhausted", err)
	}
	t.Logf("hibernate with the disk full: %v", err)
	if bx, _ := e.mgr.Get("full"); bx.State != box.StateRunning {
		t.Fatalf("the box is %s after a failed hibernate, want running", bx.State)
	}
	at := e.lastCount(ctx, t, "full")
	time.Sleep(600 * time.Millisecond)
	if c := e.lastCount(ctx, t, "full"); c <= at {
		t.Fatalf("the counter stopped at %d after the failed hibernate", c)
	}
	// More changes after the failed attempt, then room again.
	e.run(ctx, t, "full", "echo after > /tmp/after", 0)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	atHibernate := e.lastCount(ctx, t, "full")
	if _, err := e.mgr.Hibernate(ctx, "full"); err != nil {
		t.Fatalf("hibernate once there is room: %v", err)
	}
	if _, err := e.mgr.Resume(ctx, "full"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	if c := e.lastCount(ctx, t, "full"); c <= atHibernate {
		t.Fatalf("counter at %d after resume, %d at hibernate", c, atHibernate)
	}
	// Every page changed before and after the failed attempt came back.
	e.run(ctx, t, "full", "md5sum -c /tmp/noise.md5 && test \"$(cat /tmp/after)\" = after", 0)
	e.run(ctx, t, "full", `awk 'NR-1 != $1 { print "line " NR ": " $0; exit 1 }' /tmp/count`, 0)
	if res, err := e.g.Verify(ctx, nil); err != nil || !res.OK() {
		t.Fatalf("the store: %v %+v", err, res)
	}
}

// fill takes all the free space of the file system path is on, with the
// file at path.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	for { // the last few KiB
		if _, err := f.Write(buf[:4096]); err != nil {
			break
		}
	}
}

// newestPack returns the newest pack of root's store and its bytes.
func newestPack(t *testing.T, root string) (string, []byte) {
	t.Helper()
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "pack-*.pack"))
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	b, err := os.ReadFile(packs[len(packs)-1])
	if err != nil {
		t.Fatal(err)
	}
	return packs[len(packs)-1], b
}

// waitHibernated waits until box name no longer runs, which must leave it
// hibernated, and returns its note.
func waitHibernated(ctx context.Context, t *testing.T, e *boxEnv, name string) string {
	t.Helper()
	for {
		bx, err := e.mgr.Get(name)
		if err != nil {
			t.Fatal(err)
		}
		if bx.State == box.StateHibernated {
			return bx.Note
		}
		if bx.State != box.StateRunning {
			t.Fatalf("%s is %s (%s), want hibernated", name, bx.State, bx.Note)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s still runs", name)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// damageNewestPack flips a byte in every chunk-sized stretch of the newest
// pack, where the last snapshot's data went.
func damageNewestPack(t *testing.T, root string) {
	t.Helper()
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "pack-*.pack"))
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	newest := packs[len(packs)-1]
	f, err := os.OpenFile(newest, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	b := make([]byte, 1)
	for off := int64(64); off < fi.Size()-4096; off += 1024 {
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0xff
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
}
