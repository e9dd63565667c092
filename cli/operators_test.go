package cli_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/runner/qemu"
)

// TestOperatorsView runs a real daemon with its metrics endpoint, scraped
// every second by Debian's Prometheus server, and boxd events beside real
// QEMU boxes being created, forked, hibernated, resumed and removed: each
// event shows once, in order, and Prometheus's HTTP API answers the
// box-state and fork-latency series.
func TestOperatorsView(t *testing.T) {
	promBin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("the prometheus server is not installed (make deps installs it)")
	}
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d, ready := startDaemonArgs(t, root, "--metrics-listen", "127.0.0.1:0")
	t.Cleanup(func() {
		for _, n := range []string{"dev", "kid"} {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	m := regexp.MustCompile(`metrics on (http://[^ ]+/metrics)`).FindStringSubmatch(ready)
	if m == nil {
		t.Fatalf("the daemon's first line names no metrics address: %q", ready)
	}
	metricsURL := m[1]
	resp, err := http.Get(metricsURL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`boxd_boxes{state="running"} 0`, `boxd_operation_duration_seconds_count{operation="fork"} 0`, "boxd_ssh_connections_open 0", "go_goroutines"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	prom := startPrometheus(t, promBin, strings.TrimSuffix(strings.TrimPrefix(metricsURL, "http://"), "/metrics"))
	evs := watchEvents(t, root)

	ok(t, root, "create", "dev", "--image", boxtest.Image, "--memory", "256M", "--runner", "qemu")
	ok(t, root, "fork", "dev", "kid")
	ok(t, root, "hibernate", "kid")
	prom.waitFor(t, `boxd_boxes{state="hibernated"}`, 1)
	prom.waitFor(t, `boxd_boxes{state="running"}`, 1)
	prom.waitFor(t, `boxd_operation_duration_seconds_count{operation="fork"}`, 1)
	prom.waitFor(t, `boxd_operation_duration_seconds_count{operation="hibernate"}`, 1)
	prom.waitFor(t, `boxd_events_total{type="created"}`, 1)
	ok(t, root, "exec", "kid", "true") // wakes it
	prom.waitFor(t, `boxd_box_wakeups_total`, 1)
	prom.waitFor(t, `boxd_boxes{state="running"}`, 2)
	prom.waitFor(t, `count(boxd_box_memory_pss_bytes > 0)`, 2)
	prom.waitFor(t, `count(boxd_box_cpu_seconds_total{box=~"dev|kid"} > 0)`, 2)
	ok(t, root, "rm", "kid")
	ok(t, root, "rm", "dev")
	prom.waitFor(t, `boxd_boxes{state="running"}`, 0)

	want := []string{
		"created dev",
		"forked kid from dev",
		"hibernated kid requested",
		"resumed kid used",
		"removed kid",
		"removed dev",
	}
	got := evs.wait(t, len(want))
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("events:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}
	time.Sleep(500 * time.Millisecond)
	if extra := evs.wait(t, 0); len(extra) != len(want) {
		t.Fatalf("events after the last: %q", extra[len(want):])
	}

	// --since replays the kept events, and --box picks one box's; ^C
	// ends the stream as a shell reports it.
	replay := watchEventsArgs(t, root, "--since", "10m", "--box", "kid")
	got = replay.wait(t, 4)
	if strings.Join(got, "\n") != strings.Join(want[1:5], "\n") {
		t.Fatalf("replayed events of kid:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want[1:5], "\n"))
	}
	if code := replay.stop(); code != 130 {
		t.Errorf("boxd events after SIGINT: exit %d, want 130", code)
	}
	fails(t, 2, root, []string{"--since", "yesterday"}, "events", "--since", "yesterday")
}

// startDaemonArgs is startDaemon with more daemon flags; it returns the
// daemon and its first line.
func startDaemonArgs(t *testing.T, root string, args ...string) (*exec.Cmd, string) {
	t.Helper()
	cmd := command(root, append([]string{"daemon", "--ssh-listen", "127.0.0.1:0", "--idle-hibernate", "0"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			qemu.KillMachines(filepath.Join(root, "run")) // they outlive the daemon
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("boxd daemon said nothing: %v", err)
	}
	return cmd, line
}

// eventWatch is boxd events --json running in the background.
type eventWatch struct {
	mu   sync.Mutex
	got  []string
	more chan struct{}

	cmd      *exec.Cmd
	done     chan struct{} // closed when its output has been read
	stopOnce sync.Once
	code     int
}

// stop interrupts boxd events and returns its exit code.
func (w *eventWatch) stop() int {
	w.stopOnce.Do(func() {
		_ = w.cmd.Process.Signal(syscall.SIGINT)
		<-w.done
		_ = w.cmd.Wait()
		w.code = w.cmd.ProcessState.ExitCode()
	})
	return w.code
}

func watchEvents(t *testing.T, root string) *eventWatch {
	t.Helper()
	return watchEventsArgs(t, root)
}

// watchEventsArgs is watchEvents with more flags.
func watchEventsArgs(t *testing.T, root string, args ...string) *eventWatch {
	t.Helper()
	cmd := command(root, append([]string{"events", "--json"}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	w := &eventWatch{more: make(chan struct{}, 1), cmd: cmd, done: done}
	go func() {
		defer close(done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var e events.Event
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				w.add(fmt.Sprintf("not an event: %q", sc.Text()))
				continue
			}
			s := e.Type + " " + e.Box
			if e.From != "" {
				s += " from " + e.From
			}
			if e.Reason != "" {
				s += " " + e.Reason
			}
			w.add(s)
		}
	}()
	t.Cleanup(func() { w.stop() })
	// It listens once the daemon has its request: an event made now
	// could come before. Wait until the stream is open.
	time.Sleep(500 * time.Millisecond)
	return w
}

func (w *eventWatch) add(s string) {
	w.mu.Lock()
	w.got = append(w.got, s)
	w.mu.Unlock()
	select {
	case w.more <- struct{}{}:
	default:
	}
}

// wait waits for n events and returns all so far.
func (w *eventWatch) wait(t *testing.T, n int) []string {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		w.mu.Lock()
		got := append([]string(nil), w.got...)
		w.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-w.more:
		case <-deadline:
			t.Fatalf("%d events, want %d: %q", len(got), n, got)
		}
	}
}

// promServer is a Prometheus server scraping one target.
type promServer struct{ api string }

// startPrometheus runs Prometheus scraping target (host:port) every second.
func startPrometheus(t *testing.T, bin, target string) *promServer {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: boxd
    static_configs:
      - targets: [%q]
`, target)), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+addr)
	logs, err := os.Create(filepath.Join(dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logs.Name())
			t.Logf("prometheus log:\n%s", b)
		}
	})
	p := &promServer{api: "http://" + addr}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if resp, err := http.Get(p.api + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("prometheus did not become ready")
		}
	}
	p.waitFor(t, `up{job="boxd"}`, 1)
	return p
}

// query answers an instant PromQL query with a single number (false when
// the result is empty).
func (p *promServer) query(t *testing.T, q string) (float64, bool) {
	t.Helper()
	resp, err := http.Get(p.api + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("prometheus query %s: %v", q, err)
	}
	if r.Status != "success" {
		t.Fatalf("prometheus query %s: %s", q, r.Error)
	}
	if len(r.Data.Result) == 0 {
		return 0, false
	}
	s, _ := r.Data.Result[0].Value[1].(string)
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		t.Fatalf("prometheus query %s: value %q", q, s)
	}
	return v, true
}

// waitFor waits until Prometheus has scraped q at want.
func (p *promServer) waitFor(t *testing.T, q string, want float64) {
	t.Helper()
	var last float64
	var found bool
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		if last, found = p.query(t, q); found && last == want {
			return
		}
	}
	t.Fatalf("prometheus: %s is %v (found %v), want %v", q, last, found, want)
}
