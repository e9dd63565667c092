package integration

// TestRemote is two hosts sharing a bucket on a real S3 server (versitygw,
// built once into the tools cache): a box hibernated on host A resumes on
// host B after A's root is gone, and of two hosts resuming it at once one
// wins.

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// remoteReport is what boxd store report --json prints with --remote.
type remoteReport struct {
	Host       string   `json:"host"`
	PackBytes  int64    `json:"pack_bytes"`
	Boxes      []string `json:"boxes"`
	LocalBytes int64    `json:"local_pack_bytes"`
	Pending    []string `json:"pending_push"`
	Leases     []struct {
		Box, Host string
	} `json:"leases"`
}

func (d *daemonEnv) remoteReport(t *testing.T) remoteReport {
	t.Helper()
	var rep remoteReport
	if err := json.Unmarshal([]byte(d.cli(t, "store", "report", "--json")), &rep); err != nil {
		t.Fatal(err)
	}
	return rep
}

// tryCLI runs a boxd command and returns its output and error.
func (d *daemonEnv) tryCLI(args ...string) (string, error) {
	cmd := exec.Command(d.boxd, append([]string{"--root", d.root}, args...)...)
	cmd.Env = d.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// copyFile copies src to dst with mode.
func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

// newHost is a daemon on a fresh root sharing from's binary, agent, keys
// and environment, with --remote url and args.
func newHost(t *testing.T, from *daemonEnv, url string, args ...string) *daemonEnv {
	t.Helper()
	d := &daemonEnv{root: t.TempDir(), port: freePort(t), env: from.env, boxd: from.boxd, key: from.key, wrongKey: from.wrongKey,
		args: append([]string{"--remote", url}, args...)}
	d.start(t)
	t.Cleanup(func() {
		d.stop(t)
		qemu.KillMachines(filepath.Join(d.root, "run"))
	})
	return d
}

func TestRemote(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	a := newDaemonEnv(ctx, t)
	s3 := testutil.StartS3(ctx, t, t.TempDir(), "boxd")
	const url = "s3://boxd/hosts"

	// What the hosts share lives outside A's root, which goes.
	tools := t.TempDir()
	for _, f := range []struct {
		from *string
		name string
		mode os.FileMode
	}{{&a.boxd, "boxd", 0o755}, {&a.key, "key", 0o600}, {&a.wrongKey, "wrong", 0o600}} {
		copyFile(t, *f.from, filepath.Join(tools, f.name), f.mode)
		if f.name != "boxd" {
			copyFile(t, *f.from+".pub", filepath.Join(tools, f.name+".pub"), 0o644)
		}
		*f.from = filepath.Join(tools, f.name)
	}
	agentBin := filepath.Join(tools, "boxd-agent")
	copyFile(t, os.Getenv(guest.AgentEnv), agentBin, 0o755)
	t.Setenv(guest.AgentEnv, agentBin)
	a.env = append(os.Environ(), s3.Env()...)
	a.stop(t)
	a.args = []string{"--remote", url}
	a.start(t)

	// On A: a box with a known file and a counting process, hibernated.
	a.cli(t, "create", "dev", "--ssh-key", a.key+".pub")
	a.ssh(t, a.key, "dev", "head -c 8M /dev/urandom > /root/known.bin; sync")
	sum, _, _ := a.ssh(t, a.key, "dev", "sha256sum < /root/known.bin")
	a.ssh(t, a.key, "dev", counter)
	time.Sleep(time.Second)
	began := time.Now()
	a.cli(t, "hibernate", "dev")
	t.Logf("hibernate and push on A: %v", time.Since(began).Round(time.Millisecond))
	repA := a.remoteReport(t)
	if len(repA.Boxes) != 1 || repA.Boxes[0] != "dev" || len(repA.Pending) != 0 {
		t.Fatalf("bucket after A's hibernate: %+v, want box dev and no push pending", repA)
	}
	t.Logf("A: local packs %d bytes, bucket packs %d bytes", repA.LocalBytes, repA.PackBytes)
	// Resume on A, for comparison with B: the lease, no pull.
	began = time.Now()
	a.cli(t, "resume", "dev")
	t.Logf("resume on A (the host that hibernated it): %v", time.Since(began).Round(time.Millisecond))
	began = time.Now()
	a.cli(t, "hibernate", "dev")
	t.Logf("second hibernate and push on A (a delta): %v; bucket packs now %d bytes", time.Since(began).Round(time.Millisecond), a.remoteReport(t).PackBytes)

	// A goes: its daemon and QEMUs killed, its root deleted.
	a.kill(t)
	qemu.KillMachines(filepath.Join(a.root, "run"))
	if err := os.RemoveAll(a.root); err != nil {
		t.Fatal(err)
	}

	// On B: the box resumes, its file intact and its process counting on.
	b := newHost(t, a, url)
	began = time.Now()
	b.cli(t, "resume", "dev")
	resumeB := time.Since(began)
	repB := b.remoteReport(t)
	t.Logf("resume on B (pull included): %v; B fetched %d bytes (stored, compressed) of a box of 512 MiB memory and a 2 GiB disk; the bucket holds %d",
		resumeB.Round(time.Millisecond), repB.LocalBytes, repB.PackBytes)
	if got, _, _ := b.ssh(t, b.key, "dev", "sha256sum < /root/known.bin"); got != sum {
		t.Fatalf("the known file on B: %q, want %q", got, sum)
	}
	before, _, _ := b.ssh(t, b.key, "dev", "tail -n 1 /tmp/count; head -n 1 /tmp/count")
	time.Sleep(time.Second)
	after, _, _ := b.ssh(t, b.key, "dev", "tail -n 1 /tmp/count")
	if f := strings.Fields(before); len(f) != 2 || f[1] != "0" || mustAtoi(t, after) <= mustAtoi(t, f[0]) {
		t.Fatalf("the counter on B: %q then %q, want it to go on from where it was", before, after)
	}

	// A fork on B of the box that came from A.
	b.cli(t, "fork", "dev", "f1")
	if got, _, _ := b.ssh(t, b.key, "f1", "sha256sum < /root/known.bin"); got != sum {
		t.Fatalf("the known file in B's fork: %q", got)
	}
	b.cli(t, "rm", "f1")

	// B hibernates it (pushing it); then a new host C and B resume it at
	// once: one wins, the other is told who owns it.
	b.cli(t, "hibernate", "dev")
	c := newHost(t, a, url, "--remote-cache-size", "16M")
	type result struct {
		out string
		err error
	}
	res := make([]result, 2)
	var wg sync.WaitGroup
	for i, h := range []*daemonEnv{b, c} {
		wg.Go(func() {
			out, err := h.tryCLI("resume", "dev")
			res[i] = result{out, err}
		})
	}
	wg.Wait()
	winner := -1
	for i, r := range res {
		switch {
		case r.err == nil && winner >= 0:
			t.Fatalf("both hosts resumed dev: %+v", res)
		case r.err == nil:
			winner = i
		case !strings.Contains(r.out, "owned by host"):
			t.Fatalf("the losing resume: %v %s, want a refusal naming the owner", r.err, r.out)
		}
	}
	if winner < 0 {
		t.Fatalf("neither host resumed dev: %+v", res)
	}
	w := []*daemonEnv{b, c}[winner]
	t.Logf("the race: host %d won; the other said %s", winner, strings.TrimSpace(res[1-winner].out))
	if got, _, _ := w.ssh(t, w.key, "dev", "sha256sum < /root/known.bin"); got != sum {
		t.Fatalf("the known file on the winner: %q", got)
	}
	first, _, _ := w.ssh(t, w.key, "dev", "tail -n 1 /tmp/count")
	time.Sleep(time.Second)
	if later, _, _ := w.ssh(t, w.key, "dev", "tail -n 1 /tmp/count"); mustAtoi(t, later) <= mustAtoi(t, first) {
		t.Fatalf("the counter on the winner: %s then %s", first, later)
	}
	loser := []*daemonEnv{b, c}[1-winner]
	if out, err := loser.tryCLI("resume", "dev"); err == nil || !bytes.Contains([]byte(out), []byte("owned by host")) {
		t.Fatalf("a resume on the loser while the winner runs dev: %v %s", err, out)
	}
	if _, _, code := loser.ssh(t, loser.key, "dev", "true"); code == 0 {
		t.Fatal("ssh to dev on the loser while the winner runs it succeeded")
	}

	// The store goes away while the winner hibernates dev: the box stays
	// hibernated there, and its push is tried again until the store is
	// back; then the loser resumes it by SSH alone.
	last, _, _ := w.ssh(t, w.key, "dev", "tail -n 1 /tmp/count")
	s3.Stop()
	w.cli(t, "hibernate", "dev")
	if ls := w.cli(t, "ls"); !strings.Contains(ls, "hibernated") {
		t.Fatalf("the winner's boxes after a hibernate with the store down:\n%s", ls)
	}
	time.Sleep(2 * time.Second)
	s3.Restart(t)
	for i := 0; ; i++ {
		if rep := w.remoteReport(t); len(rep.Pending) == 0 {
			break
		}
		if i > 60 {
			t.Fatal("the push that failed was not tried again within a minute")
		}
		time.Sleep(time.Second)
	}
	began = time.Now()
	if got, _, code := loser.ssh(t, loser.key, "dev", "sha256sum < /root/known.bin"); got != sum || code != 0 {
		t.Fatalf("the known file by ssh on the loser: %q (exit %d)", got, code)
	}
	t.Logf("ssh on the other host after the retried push (resume and pull of the new state included): %v", time.Since(began).Round(time.Millisecond))
	if now, _, _ := loser.ssh(t, loser.key, "dev", "tail -n 1 /tmp/count"); mustAtoi(t, now) <= mustAtoi(t, last) {
		t.Fatalf("the counter on the loser: %s, it was %s on the winner", now, last)
	}

	// C keeps at most 16 MiB of packs the bucket holds: what it pulled for
	// its resume was evicted after it, the box running on.
	repC := c.remoteReport(t)
	t.Logf("C, with --remote-cache-size 16M: %d bytes of packs kept, the bucket holds %d", repC.LocalBytes, repC.PackBytes)
	if repC.LocalBytes > 16<<20 {
		t.Fatalf("C keeps %d bytes of packs, over its 16 MiB bound", repC.LocalBytes)
	}

	for name, h := range map[string]*daemonEnv{"B": b, "C": c} {
		logged, _ := os.ReadFile(filepath.Join(h.root, "daemon.log"))
		for _, line := range strings.Split(string(logged), "\n") {
			if strings.Contains(line, "remote: pulled") || strings.Contains(line, "remote: fetched evicted") || strings.Contains(line, "remote: evicted") {
				t.Logf("%s: %s", name, line[strings.Index(line, "msg="):])
			}
		}
	}

	// A daemon that stops hands its boxes over: it hibernates and pushes
	// them, and gives up their leases.
	loser.stop(t)
	if rep := w.remoteReport(t); len(rep.Leases) != 0 {
		t.Fatalf("leases after the owner's daemon stopped: %+v, want none", rep.Leases)
	}
	if out, err := w.tryCLI("resume", "dev"); err != nil {
		t.Fatalf("resume on the winner after the other host stopped: %v %s", err, out)
	}
	if got, _, _ := w.ssh(t, w.key, "dev", "sha256sum < /root/known.bin"); got != sum {
		t.Fatalf("the known file after the hand-over on stop: %q", got)
	}
}
