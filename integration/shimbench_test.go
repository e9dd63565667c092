package integration

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"
)

// benchEnv is the variable that turns on the measurements the bench/
// scripts print (bench/containerd.sh); tests skip them otherwise.
const benchEnv = "BOXD_BENCH_CONTAINERD"

// skipUnlessBench skips a measurement unless bench/containerd.sh runs it.
func skipUnlessBench(t *testing.T) {
	t.Helper()
	if os.Getenv(benchEnv) == "" {
		t.Skipf("a measurement for bench/containerd.sh: set %s=1", benchEnv)
	}
}

// againstRunc times ctr run --rm of true, and the time to a container's
// first output, with boxd's shim and with runc on the same image and
// snapshotter, alternating, and prints the medians side by side.
func (s *shimTest) againstRunc(t *testing.T) {
	skipUnlessBench(t)
	const rounds = 5
	runtimes := []struct{ name, flag string }{{"boxd", "--runtime=" + runtimeName}, {"runc", "--runtime=io.containerd.runc.v2"}}
	total := map[string][]time.Duration{}
	first := map[string][]time.Duration{}
	for range rounds {
		for _, rt := range runtimes {
			began := time.Now()
			if _, errOut, code := s.ctr(t, "", "run", "--rm", rt.flag, "--snapshotter", snapshotterName, s.im.ref, s.id(), "true"); code != 0 {
				t.Fatalf("%s: ctr run --rm true: exit %d\n%s", rt.name, code, errOut)
			}
			total[rt.name] = append(total[rt.name], time.Since(began))
			first[rt.name] = append(first[rt.name], s.firstOutput(t, rt.flag))
		}
	}
	fmt.Printf("\nctr run --rm, %d rounds, medians (range)\n%-32s %22s %22s\n", rounds, "", "boxd shim", "runc")
	for _, row := range []struct {
		what string
		m    map[string][]time.Duration
	}{{"ctr run --rm true, end to end", total}, {"to the container's first output", first}} {
		fmt.Printf("%-32s %22s %22s\n", row.what, spread(row.m["boxd"]), spread(row.m["runc"]))
	}
}

// firstOutput times ctr run --rm of echo until its output arrives.
func (s *shimTest) firstOutput(t *testing.T, runtimeFlag string) time.Duration {
	t.Helper()
	cmd := exec.CommandContext(s.ctx, s.d.tool("ctr"), s.d.ctrArgs("run", "--rm", runtimeFlag, "--snapshotter", snapshotterName, s.im.ref, s.id(), "echo", "first")...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	took := time.Since(began)
	if werr := cmd.Wait(); err != nil || werr != nil || line != "first\n" {
		t.Fatalf("ctr run echo first: %q, %v, %v", line, err, werr)
	}
	return took
}

// spread is the median of ds and their range.
func spread(ds []time.Duration) string {
	s := slices.Clone(ds)
	slices.Sort(s)
	r := func(d time.Duration) string { return fmt.Sprintf("%.0f", float64(d.Microseconds())/1000) }
	return fmt.Sprintf("%s ms (%s-%s)", r(s[len(s)/2]), r(s[0]), r(s[len(s)-1]))
}
