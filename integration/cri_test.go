package integration

// TestCRI runs a Kubernetes pod as one box: containerd 1.6's CRI, with a
// runtime handler boxd (what a RuntimeClass names) of the shim, driven by
// crictl as the kubelet would drive it.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/shim"
	"github.com/creack/pty"
)

// criConfig is the CRI plugin's configuration: boxd's snapshotter for
// every runtime (containerd 1.6 has one), the runtimes runc and boxd, an
// empty CNI (the pods share the node's network namespace; a box has its
// own network anyway), and the OOM score a sandbox asks for clamped to
// what this host lets a process set.
const criConfig = `
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = %q
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.boxd]
      runtime_type = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`

// criTest is TestCRI's containerd, daemon and crictl.
type criTest struct {
	ctx     context.Context
	d       *daemons
	dm      *daemonEnv
	crictl  string
	dir     string
	busybox image
	n       int
}

func TestCRI(t *testing.T) {
	ctx, tmp := shimTestSetup(t, 20*time.Minute)
	runCRITests(ctx, t, tmp, "")
}

// TestCRIContainerd2 runs TestCRI's steps under containerd 2.x (built
// from the Go module proxy into the tools cache), whose CRI takes the same
// configuration.
func TestCRIContainerd2(t *testing.T) {
	ctx, tmp := shimTestSetup(t, 25*time.Minute)
	runCRITests(ctx, t, tmp, testutil.Containerd2.Build(ctx, t))
}

// runCRITests runs the pod's steps with the containerd in bin ("" for the
// system's).
func runCRITests(ctx context.Context, t *testing.T, tmp, bin string) {
	dm, snapSock := startShimDaemon(ctx, t, tmp)
	crictl := filepath.Join(testutil.Crictl.Build(ctx, t), "crictl")

	images := filepath.Join(tmp, "images")
	busybox := busyboxImage(t, images)
	pause := image{ref: "docker.io/boxd/pause:test", tar: filepath.Join(images, "pause.tar"), layers: busybox.layers}
	if _, err := writeImageCmd(pause.tar, pause.ref, []string{"/bin/sleep", "2147483647"}, pause.layers); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"cni/bin", "cni/conf", "logs"} {
		if err := os.MkdirAll(filepath.Join(tmp, dir), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	d := &daemons{t: t, dir: filepath.Join(tmp, "ctr"), boxdRoot: dm.root, boxdSock: snapSock,
		ctrSock: filepath.Join(tmp, "ctr", "containerd.sock"), ns: "k8s.io", bin: bin,
		cri: fmt.Sprintf(criConfig, pause.ref, snapshotterName, runtimeName, filepath.Join(tmp, "cni/bin"), filepath.Join(tmp, "cni/conf"))}
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	d.startContainerd()
	d.importImage(busybox)
	d.importImage(pause)
	c := &criTest{ctx: ctx, d: d, dm: dm, crictl: crictl, dir: tmp, busybox: busybox}
	t.Cleanup(func() { c.removeAll(t) })

	t.Run("pod", c.pod)
	t.Run("first log line against runc", c.firstLine)
}

// run runs crictl against the test's containerd and returns its stdout;
// a failure fails the test.
func (c *criTest) run(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code, err := runIn(c.ctx, 5*time.Minute, nil, c.crictl, c.args(args...)...)
	if err != nil || code != 0 {
		t.Fatalf("crictl %s: exit %d, %v\n%s", strings.Join(args, " "), code, err, tail(errOut, 20))
	}
	return strings.TrimSpace(out)
}

// checkStats checks that crictl stats reports container id's CPU time and
// memory (its box's).
func (c *criTest) checkStats(t *testing.T, id string) {
	t.Helper()
	type value struct {
		Value json.RawMessage `json:"value"`
	}
	var out struct {
		Stats []struct {
			Attributes struct {
				ID string `json:"id"`
			} `json:"attributes"`
			CPU struct {
				UsageCoreNanoSeconds value `json:"usageCoreNanoSeconds"`
			} `json:"cpu"`
			Memory struct {
				WorkingSetBytes value `json:"workingSetBytes"`
			} `json:"memory"`
		} `json:"stats"`
	}
	raw := c.run(t, "stats", "-o", "json", id)
	if err := json.Unmarshal([]byte(raw), &out); err != nil {
		t.Fatalf("crictl stats -o json: %v\n%s", err, raw)
	}
	number := func(v value) uint64 {
		n, _ := strconv.ParseUint(strings.Trim(string(v.Value), `"`), 10, 64)
		return n
	}
	if len(out.Stats) != 1 || out.Stats[0].Attributes.ID != id || number(out.Stats[0].CPU.UsageCoreNanoSeconds) == 0 ||
		number(out.Stats[0].Memory.WorkingSetBytes) < 16<<20 {
		t.Fatalf("crictl stats of %s: %s; want its CPU time and at least 16 MiB of memory", id, raw)
	}
}

// args are crictl's arguments for the test's containerd.
func (c *criTest) args(args ...string) []string {
	ep := "unix://" + c.d.ctrSock
	return append([]string{"--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "5m"}, args...)
}

// writeJSON writes v as JSON to a new file of the test's folder and
// returns its path.
func (c *criTest) writeJSON(t *testing.T, v any) string {
	t.Helper()
	c.n++
	path := filepath.Join(c.dir, fmt.Sprintf("cri-%d.json", c.n))
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// podConfig is a pod's configuration in the node's network namespace.
func (c *criTest) podConfig(t *testing.T, name, hostname string) string {
	t.Helper()
	cfg := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": fmt.Sprintf("%s-%d", name, os.Getpid())},
		"log_directory": filepath.Join(c.dir, "logs", name),
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	}
	if hostname != "" {
		cfg["hostname"] = hostname
	}
	return c.writeJSON(t, cfg)
}

// containerConfig is the configuration of a busybox container running
// script with sh.
func (c *criTest) containerConfig(t *testing.T, name, script string) string {
	t.Helper()
	return c.writeJSON(t, map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": c.busybox.ref},
		"command":  []string{"sh", "-c", script},
		"log_path": name + ".log",
	})
}

// podBoxes lists the daemon's boxes of pod sandbox id.
func (c *criTest) podBoxes(t *testing.T, id string) []listedBox {
	t.Helper()
	var list []listedBox
	if err := json.Unmarshal([]byte(c.dm.cli(t, "ls", "--json")), &list); err != nil {
		t.Fatal(err)
	}
	var out []listedBox
	for _, b := range list {
		if b.Labels[shim.LabelID] == id && b.Labels[shim.LabelNamespace] == "k8s.io" {
			out = append(out, b)
		}
	}
	return out
}

// waitExited waits until container id exited and returns its exit code.
func (c *criTest) waitExited(t *testing.T, id string) int {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		var st struct {
			Status struct {
				State    string `json:"state"`
				ExitCode int    `json:"exitCode"`
			} `json:"status"`
		}
		if err := json.Unmarshal([]byte(c.run(t, "inspect", "-o", "json", id)), &st); err != nil {
			t.Fatal(err)
		}
		if st.Status.State == "CONTAINER_EXITED" {
			return st.Status.ExitCode
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s is still %s", id, st.Status.State)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitLog waits until container id's log holds want and returns it.
func (c *criTest) waitLog(t *testing.T, id, want string) string {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, _, _, _ := runIn(c.ctx, time.Minute, nil, c.crictl, c.args("logs", id)...)
		if strings.Contains(out, want) {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("container %s's log has no %q:\n%s", id, want, tail(out, 20))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *criTest) pod(t *testing.T) {
	host, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		t.Fatal(err)
	}
	podCfg := c.podConfig(t, "web", "web-pod")
	pod := c.run(t, "runp", "--runtime", "boxd", podCfg)
	boxes := c.podBoxes(t, pod)
	if len(boxes) != 1 || boxes[0].State != "running" || boxes[0].Labels[shim.LabelPodName] != "web" || boxes[0].Labels[shim.LabelPodNamespace] != "default" {
		t.Fatalf("the pod's boxes: %+v, want one running, labelled with the pod's names", boxes)
	}
	bx := boxes[0].Name

	// Two containers in the pod: both run in its box, on its kernel,
	// with its network and hostname.
	server := c.run(t, "create", pod, c.containerConfig(t, "server", "echo server up; sleep 2147483647"), podCfg)
	c.run(t, "start", server)
	job := c.run(t, "create", pod, c.containerConfig(t, "job", "uname -r; cat /sys/class/net/eth0/address; hostname; exit 7"), podCfg)
	c.run(t, "start", job)
	if boxes := c.podBoxes(t, pod); len(boxes) != 1 || boxes[0].Labels[shim.LabelContainerPrefix+"server"] != server || boxes[0].Labels[shim.LabelContainerPrefix+"job"] != job {
		t.Fatalf("the pod's box's labels: %+v, want one per container, its name to its id", boxes)
	}
	if code := c.waitExited(t, job); code != 7 {
		t.Fatalf("the job's exit code %d, want 7", code)
	}
	jobLog := strings.Fields(c.waitLog(t, job, "web-pod"))
	c.waitLog(t, server, "server up")
	c.checkStats(t, server)
	execOut := strings.Fields(c.run(t, "exec", server, "sh", "-c", "uname -r; cat /sys/class/net/eth0/address; hostname"))
	if len(jobLog) != 3 || len(execOut) != 3 {
		t.Fatalf("the job's log %q, the exec's output %q: want a kernel, an address and a hostname each", jobLog, execOut)
	}
	if jobLog[0] == strings.TrimSpace(string(host)) || jobLog[0] != execOut[0] {
		t.Fatalf("kernels: job %s, exec %s, host %s: want the box's, the same for both", jobLog[0], execOut[0], host)
	}
	if jobLog[1] != execOut[1] || jobLog[2] != "web-pod" || execOut[2] != "web-pod" {
		t.Fatalf("network and hostname: job %v, exec %v: want the pod's box's, the same for both", jobLog[1:], execOut[1:])
	}
	// Each container sees its own root file system.
	c.run(t, "exec", server, "sh", "-c", "echo mine > /marker")
	if out, _, code, _ := runIn(c.ctx, time.Minute, nil, c.crictl, c.args("exec", job, "test", "-e", "/marker")...); code == 0 {
		t.Fatalf("the server's file is in the job's root file system (%s)", out)
	}
	// The status of an exec, waited for (--sync) and streamed: crictl
	// fails and says it.
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"--sync"}, "exited with 5"},
		{nil, "exit code 5"},
	} {
		args := append(append([]string{"exec"}, tc.flags...), server, "sh", "-c", "exit 5")
		if _, errOut, code, _ := runIn(c.ctx, time.Minute, nil, c.crictl, c.args(args...)...); code == 0 || !strings.Contains(errOut, tc.want) {
			t.Fatalf("crictl %v: exit %d, %q; want a failure saying %q", args, code, errOut, tc.want)
		}
	}
	c.execTerminal(t, server)

	// The pod's box is an ordinary box: it snapshots and forks like any
	// other, its containers' files and processes with it.
	c.dm.cli(t, "snapshot", bx)
	c.dm.cli(t, "fork", bx, "pod-copy")
	if out := c.dm.cli(t, "exec", "pod-copy", "--", "/.boxd/containers/"+server+"/rootfs/bin/cat", "/.boxd/containers/"+server+"/rootfs/marker"); strings.TrimSpace(out) != "mine" {
		t.Fatalf("the fork of the pod's box: the server's file reads %q", out)
	}
	c.dm.cli(t, "rm", "pod-copy")

	// Stop and remove leave no box, memory file, shim socket or mount.
	c.run(t, "stop", server)
	if code := c.waitExited(t, server); code != 128+int(syscall.SIGKILL) && code != 128+int(syscall.SIGTERM) {
		t.Fatalf("the stopped server's exit code %d, want a death by signal", code)
	}
	c.run(t, "rm", server, job)
	if boxes := c.podBoxes(t, pod); len(boxes) != 1 || boxes[0].Labels[shim.LabelContainerPrefix+"server"] != "" {
		t.Fatalf("the pod's box after its containers were removed: %+v", boxes)
	}
	c.run(t, "stopp", pod)
	c.run(t, "rmp", pod)
	c.checkNothingLeft(t, pod)
}

// execTerminal runs crictl exec -it under a terminal.
func (c *criTest) execTerminal(t *testing.T, id string) {
	t.Helper()
	// The window's size follows the start (CRI's streams resize the
	// terminal once they are up): the script waits for it a while.
	script := `tty; for i in $(seq 50); do s=$(stty size); [ "$s" != "24 80" ] && break; sleep 0.1; done; echo $s`
	cmd := exec.CommandContext(c.ctx, c.crictl, c.args("exec", "-it", id, "sh", "-c", script)...)
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 31, Cols: 97})
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	var out strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := ptmx.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			break
		}
	}
	_ = cmd.Wait()
	if !strings.Contains(out.String(), "/dev/pts/") || !strings.Contains(out.String(), "31 97") {
		t.Fatalf("crictl exec -it: %q, want a terminal of 31 x 97", out.String())
	}
}

// checkNothingLeft checks that pod's box, its memory files, the shims'
// sockets and mounts under the test's folder are gone.
func (c *criTest) checkNothingLeft(t *testing.T, pod string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for len(c.podBoxes(t, pod)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the pod's box is left: %+v", c.podBoxes(t, pod))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The box's spares stop in the background.
	for files := memFiles(t, memFolder(t, c.dm.root)); len(files) > 0; files = memFiles(t, memFolder(t, c.dm.root)) {
		if time.Now().After(deadline) {
			t.Fatalf("memory files left: %v", files)
		}
		time.Sleep(200 * time.Millisecond)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), c.dir) {
		t.Fatalf("mounts left under %s", c.dir)
	}
	// The shim goes on its own once containerd lets it go (Shutdown): it
	// answers the call first, then drains its events.
	for pid := podShim(t, pod); pid != 0; pid = podShim(t, pod) {
		if time.Now().After(deadline) {
			t.Fatalf("the pod's shim (pid %d) still runs", pid)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sock := shim.SocketPath(c.d.ctrSock, c.d.namespace(), pod); fileExists(sock) {
		t.Fatalf("the pod's shim's socket %s is left", sock)
	}
}

// shimPids lists the boxd shims that run.
func shimPids(t *testing.T) []int {
	t.Helper()
	var out []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), "containerd-shim-boxd-v2") {
			continue
		}
		var pid int
		if _, err := fmt.Sscanf(filepath.Base(filepath.Dir(p)), "%d", &pid); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// podShim returns the pid of the boxd shim that serves pod, or 0.
func podShim(t *testing.T, pod string) int {
	t.Helper()
	for _, pid := range shimPids(t) {
		if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(cmdline), pod) {
			return pid
		}
	}
	return 0
}

// firstLine measures crictl runp, create and start of a busybox container
// to its first log line, with boxd and with runc, in this run: a figure
// for the record, not a bound.
func (c *criTest) firstLine(t *testing.T) {
	skipUnlessBench(t)
	took := map[string][]time.Duration{}
	for range 3 {
		for _, handler := range []string{"boxd", "runc"} {
			took[handler] = append(took[handler], c.runpToFirstLine(t, handler))
		}
	}
	fmt.Printf("\ncrictl runp, create and start to the first log line, 3 rounds, medians (range)\n%22s %22s\n%22s %22s\n",
		"boxd", "runc", spread(took["boxd"]), spread(took["runc"]))
}

// runpToFirstLine times crictl runp, create and start of a busybox
// container of handler to its first log line, then removes the pod.
func (c *criTest) runpToFirstLine(t *testing.T, handler string) time.Duration {
	t.Helper()
	c.n++
	began := time.Now()
	podCfg := c.podConfig(t, fmt.Sprintf("first-%s-%d", handler, c.n), "")
	pod := c.run(t, "runp", "--runtime", handler, podCfg)
	id := c.run(t, "create", pod, c.containerConfig(t, "hello", "echo hello; sleep 2147483647"), podCfg)
	c.run(t, "start", id)
	c.waitLog(t, id, "hello")
	took := time.Since(began)
	c.run(t, "stop", id)
	c.run(t, "rm", id)
	c.run(t, "stopp", pod)
	c.run(t, "rmp", pod)
	return took
}

// removeAll removes what pods a failed test left.
func (c *criTest) removeAll(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, _, _, _ := runIn(ctx, time.Minute, nil, c.crictl, c.args("pods", "-q")...)
	for _, pod := range strings.Fields(out) {
		_, _, _, _ = runIn(ctx, time.Minute, nil, c.crictl, c.args("stopp", pod)...)
		_, _, _, _ = runIn(ctx, time.Minute, nil, c.crictl, c.args("rmp", "-f", pod)...)
	}
}

// fileExists says whether path names anything.
func fileExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
