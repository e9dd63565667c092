package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/memstore"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// StoreReportEvery is how old the store figures a scrape answers may be:
// the dedup report reads every snapshot's map, too much for each scrape.
const StoreReportEvery = time.Minute

// Metrics is the daemon's Prometheus view: boxes by state, how long
// operations take, SSH connections, the store, memory served lazily and
// each box's CPU time. Label values are bounded: operation and state names,
// outcomes, and the names of boxes that exist; never keys or paths.
type Metrics struct {
	mgr   Manager
	graph Graph
	log   *slog.Logger
	reg   *prometheus.Registry

	ops     *prometheus.HistogramVec
	events  *prometheus.CounterVec
	wakeups prometheus.Counter
	exits   prometheus.Counter
	gcRuns  prometheus.Counter
	gcFreed prometheus.Counter
	ssh     *prometheus.CounterVec
	sshOpen prometheus.Gauge
	// forks are the snapshots of the last forks observed: one observation
	// per fork, not per child.
	forks []string

	storeMu    sync.Mutex
	store      snapshotter.Report
	storeAt    time.Time // when store was made; zero before the first
	refreshing bool
}

// Descriptions of the figures read at each scrape.
var (
	descBoxes      = prometheus.NewDesc("boxd_boxes", "Boxes by state.", []string{"state"}, nil)
	descBoxCPU     = prometheus.NewDesc("boxd_box_cpu_seconds_total", "Host CPU time (user and system) of a running box's machine since it started.", []string{"box"}, nil)
	descBoxPSS     = prometheus.NewDesc("boxd_box_memory_pss_bytes", "Host memory a running box's machine holds, a page shared by n processes counted as 1/n (PSS).", []string{"box"}, nil)
	descBoxRSS     = prometheus.NewDesc("boxd_box_memory_rss_bytes", "Host memory a running box's machine maps resident, shared pages counted in full (RSS).", []string{"box"}, nil)
	descBoxDisk    = prometheus.NewDesc("boxd_box_disk_bytes", "Host disk the writable top of a box's disk takes.", []string{"box"}, nil)
	descBoxStarted = prometheus.NewDesc("boxd_box_started_timestamp_seconds", "When a running box's machine started (booted, resumed or restored as a fork), Unix time.", []string{"box"}, nil)
	descMemFilled  = prometheus.NewDesc("boxd_memory_pages_filled_total", "Guest memory pages restores served from the store over userfaultfd: on the guest's fault (lazily) or by prefetching. Boxes under QEMU restore from a memory image file and are not counted.", []string{"how"}, nil)
	descStoreBytes = prometheus.NewDesc("boxd_store_bytes", "The store's bytes: logical (every snapshot's size), referenced (less zero blocks), unique (distinct chunks), stored (compressed in packs), garbage (in packs, referenced by no snapshot).", []string{"kind"}, nil)
	descStorePacks = prometheus.NewDesc("boxd_store_packs", "Pack files in the store.", nil, nil)
	descStoreSnaps = prometheus.NewDesc("boxd_store_snapshots", "Snapshots in the store.", nil, nil)
	descStoreAge   = prometheus.NewDesc("boxd_store_report_timestamp_seconds", "When the store figures were computed (Unix time); they are at most a minute old when read.", nil, nil)
)

// Operations whose latency Metrics observes, by the event that ends them.
var operationOf = map[string]string{
	events.Created:    "create",
	events.Forked:     "fork",
	events.Started:    "start",
	events.Hibernated: "hibernate",
	events.Resumed:    "resume",
	events.Snapshot:   "snapshot",
	events.GC:         "gc",
}

// NewMetrics returns the metrics of the daemon whose boxes mgr keeps, on
// graph's store, told of events by x.
func NewMetrics(mgr Manager, graph Graph, x *events.Exchange, log *slog.Logger) *Metrics {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Metrics{
		mgr: mgr, graph: graph, log: log, reg: prometheus.NewRegistry(),
		ops: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "boxd_operation_duration_seconds",
			Help:    "How long box operations took, from the request to the box running (create, fork, start, resume), hibernated, or its snapshot committed; and store gc runs.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 15), // 10 ms to 164 s
		}, []string{"operation"}),
		events:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "boxd_events_total", Help: "Events the daemon told (boxd events), by type."}, []string{"type"}),
		wakeups: prometheus.NewCounter(prometheus.CounterOpts{Name: "boxd_box_wakeups_total", Help: "Boxes resumed, booted or unpaused because an SSH connection or an exec reached them."}),
		exits:   prometheus.NewCounter(prometheus.CounterOpts{Name: "boxd_box_machine_exits_total", Help: "Box machines that ended without being asked to (a crash, the OOM killer, a guest power-off)."}),
		gcRuns:  prometheus.NewCounter(prometheus.CounterOpts{Name: "boxd_gc_runs_total", Help: "Store garbage collections run."}),
		gcFreed: prometheus.NewCounter(prometheus.CounterOpts{Name: "boxd_gc_freed_bytes_total", Help: "Bytes store garbage collections freed."}),
		ssh:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "boxd_ssh_connections_total", Help: "SSH connections to the front door by outcome: connected, refused (no key opens the box), failed (handshake), unreachable (the box could not be woken), disconnected."}, []string{"outcome"}),
		sshOpen: prometheus.NewGauge(prometheus.GaugeOpts{Name: "boxd_ssh_connections_open", Help: "SSH connections to boxes open now."}),
	}
	for op := range operationOf {
		m.ops.WithLabelValues(operationOf[op]) // every operation shows, at 0
	}
	for _, o := range []sshproxy.Outcome{sshproxy.Connected, sshproxy.Refused, sshproxy.Failed, sshproxy.Unreachable, sshproxy.Disconnected} {
		m.ssh.WithLabelValues(string(o))
	}
	m.reg.MustRegister(m.ops, m.events, m.wakeups, m.exits, m.gcRuns, m.gcFreed, m.ssh, m.sshOpen, m,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if x != nil {
		x.Observe(m.observe)
	}
	return m
}

// observe counts one event (events.Exchange.Observe: quick, in order).
func (m *Metrics) observe(e events.Event) {
	m.events.WithLabelValues(e.Type).Inc()
	if op, ok := operationOf[e.Type]; ok && e.Took > 0 {
		if e.Type == events.Forked {
			if slices.Contains(m.forks, e.Snapshot) {
				return // another child of a fork observed already
			}
			if m.forks = append(m.forks, e.Snapshot); len(m.forks) > 64 {
				m.forks = m.forks[1:]
			}
		}
		m.ops.WithLabelValues(op).Observe(e.Took.Seconds())
	}
	switch {
	case e.Reason == events.ReasonUsed:
		m.wakeups.Inc()
	case e.Type == events.Stopped && e.Reason != events.ReasonRequested:
		m.exits.Inc()
	case e.Type == events.GC:
		m.gcRuns.Inc()
		m.gcFreed.Add(float64(e.Bytes))
	}
}

// SSH counts one SSH connection's outcome (sshproxy.Server.Observe).
func (m *Metrics) SSH(o sshproxy.Outcome) {
	m.ssh.WithLabelValues(string(o)).Inc()
	switch o {
	case sshproxy.Connected:
		m.sshOpen.Inc()
	case sshproxy.Disconnected:
		m.sshOpen.Dec()
	}
}

// Handler serves the metrics in Prometheus's exposition formats.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(m.log.Handler(), slog.LevelWarn)}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boxd serves its metrics on /metrics", http.StatusNotFound)
	})
	return mux
}

// Describe sends the descriptions of the figures read at each scrape.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descBoxes, descBoxCPU, descBoxPSS, descBoxRSS, descBoxDisk, descBoxStarted, descMemFilled, descStoreBytes, descStorePacks, descStoreSnaps, descStoreAge} {
		ch <- d
	}
}

// Collect reads the boxes, their CPU time, the memory restores filled and
// the store's figures (StoreReportEvery old at most).
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	usage, err := m.mgr.Usage(ctx, nil, box.UsageOptions{})
	if err != nil {
		m.log.Warn("metrics: the boxes' usage", "err", err)
	}
	states := map[string]int{box.StateRunning: 0, box.StatePaused: 0, box.StateHibernated: 0, box.StateStopped: 0}
	for _, u := range usage {
		states[u.State]++
		if d := u.Disk; d != nil {
			ch <- prometheus.MustNewConstMetric(descBoxDisk, prometheus.GaugeValue, float64(d.Allocated), u.Name)
		}
		if u.State != box.StateRunning && u.State != box.StatePaused {
			continue
		}
		if u.CPUSeconds != nil {
			ch <- prometheus.MustNewConstMetric(descBoxCPU, prometheus.CounterValue, *u.CPUSeconds, u.Name)
		}
		if hm := u.HostMemory; hm != nil {
			ch <- prometheus.MustNewConstMetric(descBoxPSS, prometheus.GaugeValue, float64(hm.PSS), u.Name)
			ch <- prometheus.MustNewConstMetric(descBoxRSS, prometheus.GaugeValue, float64(hm.RSS), u.Name)
		}
		if !u.Started.IsZero() {
			ch <- prometheus.MustNewConstMetric(descBoxStarted, prometheus.GaugeValue, float64(u.Started.UnixNano())/1e9, u.Name)
		}
	}
	for s, n := range states {
		ch <- prometheus.MustNewConstMetric(descBoxes, prometheus.GaugeValue, float64(n), s)
	}
	faulted, prefetched := memstore.Totals()
	ch <- prometheus.MustNewConstMetric(descMemFilled, prometheus.CounterValue, float64(faulted), "fault")
	ch <- prometheus.MustNewConstMetric(descMemFilled, prometheus.CounterValue, float64(prefetched), "prefetch")

	rep, at := m.storeReport()
	if at.IsZero() {
		return
	}
	for kind, n := range map[string]int64{
		"logical": rep.LogicalBytes, "referenced": rep.ReferencedBytes, "unique": rep.UniqueBytes,
		"stored": rep.StoredBytes, "garbage": rep.Store.GarbageBytes,
	} {
		ch <- prometheus.MustNewConstMetric(descStoreBytes, prometheus.GaugeValue, float64(n), kind)
	}
	ch <- prometheus.MustNewConstMetric(descStorePacks, prometheus.GaugeValue, float64(rep.Store.Packs))
	ch <- prometheus.MustNewConstMetric(descStoreSnaps, prometheus.GaugeValue, float64(rep.Snapshots))
	ch <- prometheus.MustNewConstMetric(descStoreAge, prometheus.GaugeValue, float64(at.UnixNano())/1e9)
}

// storeReport returns the store's dedup report and when it was made. One
// older than StoreReportEvery is made again in the background, and served
// meanwhile; the first is waited for, briefly.
func (m *Metrics) storeReport() (snapshotter.Report, time.Time) {
	m.storeMu.Lock()
	rep, at := m.store, m.storeAt
	stale := time.Since(at) > StoreReportEvery && !m.refreshing
	var done chan struct{}
	if stale {
		m.refreshing = true
		done = make(chan struct{})
		go m.refreshStore(done)
	}
	m.storeMu.Unlock()
	if at.IsZero() && done != nil {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
		m.storeMu.Lock()
		rep, at = m.store, m.storeAt
		m.storeMu.Unlock()
	}
	return rep, at
}

func (m *Metrics) refreshStore(done chan struct{}) {
	defer close(done)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := m.graph.Report(ctx)
	m.storeMu.Lock()
	defer m.storeMu.Unlock()
	m.refreshing = false
	if err != nil {
		m.log.Warn("metrics: the store's report", "err", err)
		return
	}
	m.store, m.storeAt = rep, time.Now()
}

// CheckMetricsAddr refuses an address to serve metrics on that other
// hosts may reach, unless allowRemote: a loopback IP or localhost is
// local; a wildcard, another IP or a host name is not.
func CheckMetricsAddr(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics address %q: want host:port: %w", addr, errdefs.ErrInvalidArgument)
	}
	if allowRemote || host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("metrics address %s is reachable from other hosts; serve metrics on loopback (127.0.0.1:9464) or give --metrics-allow-remote: %w", addr, errdefs.ErrInvalidArgument)
}
