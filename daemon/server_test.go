package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// testKey is an authorized_keys line for the tests.
const testKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"

// fakeManager is the test double of the box manager: boxes in a map, every
// call recorded, and an error to answer instead when err is set.
type fakeManager struct {
	mu    sync.Mutex
	boxes map[string]box.Box
	calls []string
	err   error // returned by every call that can fail, when set
	// execOut is what Exec writes on stdout; execCode is its exit code.
	execOut  string
	execCode int
	// execStarted, when not nil, gets a value once Exec runs; Exec then
	// waits for execRelease.
	execStarted chan struct{}
	execRelease chan struct{}
	// beforeIdleCheck, when not nil, runs in HibernateIfIdle before it
	// takes the box's lock; whileHibernating, when not nil, runs once it
	// has decided to hibernate, with the lock held.
	beforeIdleCheck  func(name string)
	whileHibernating func(name string)

	// boxLocks are the boxes' locks, which HibernateIfIdle holds and Exec
	// takes before it reaches the box, as box.Manager's do.
	boxLocks sync.Map // name → *sync.Mutex

	// cpu is each box's CPU time, as CPUTime reports it.
	cpu map[string]time.Duration

	// consoleDir is where ConsolePath puts each box's console, NAME.log.
	consoleDir string
}

func (m *fakeManager) CPUTime(name string) (time.Duration, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.cpu[name]
	return d, ok
}

func (m *fakeManager) setCPU(name string, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cpu == nil {
		m.cpu = map[string]time.Duration{}
	}
	m.cpu[name] = d
}

func newFakeManager(boxes ...box.Box) *fakeManager {
	m := &fakeManager{boxes: map[string]box.Box{}}
	for _, b := range boxes {
		m.boxes[b.Name] = b
	}
	return m
}

func (m *fakeManager) record(format string, args ...any) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, fmt.Sprintf(format, args...))
	return m.err
}

// lockBox takes box name's lock and returns its release.
func (m *fakeManager) lockBox(name string) func() {
	l, _ := m.boxLocks.LoadOrStore(name, &sync.Mutex{})
	l.(*sync.Mutex).Lock()
	return l.(*sync.Mutex).Unlock
}

func (m *fakeManager) lookup(name string) (box.Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.boxes[name]
	if !ok {
		return box.Box{}, fmt.Errorf("%q: %w", name, box.ErrNotFound)
	}
	return b, nil
}

func (m *fakeManager) setState(name, state string) (box.Box, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.boxes[name]
	if !ok {
		return box.Box{}, fmt.Errorf("%q: %w", name, box.ErrNotFound)
	}
	b.State = state
	m.boxes[name] = b
	return b, nil
}

func (m *fakeManager) List() ([]box.Box, error) {
	if err := m.record("list"); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []box.Box
	for _, b := range m.boxes {
		out = append(out, b)
	}
	slices.SortFunc(out, func(a, b box.Box) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func (m *fakeManager) Get(name string) (box.Box, error) {
	if err := m.record("get %s", name); err != nil {
		return box.Box{}, err
	}
	return m.lookup(name)
}

func (m *fakeManager) Create(_ context.Context, o box.CreateOptions) (box.Box, error) {
	runnerNote := ""
	if o.Runner != "" {
		runnerNote = " runner=" + o.Runner
	}
	if o.BaseSnapshot != "" {
		runnerNote += " base=" + o.BaseSnapshot
	}
	if err := m.record("create %s image=%s memory=%d cpus=%d keys=%d%s", o.Name, o.Image, o.Memory, o.CPUs, len(o.Keys), runnerNote); err != nil {
		return box.Box{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.boxes[o.Name]; ok {
		return box.Box{}, fmt.Errorf("%q: %w", o.Name, box.ErrExists)
	}
	b := box.Box{Name: o.Name, State: box.StateRunning, Image: o.Image, Memory: o.Memory, CPUs: o.CPUs, Keys: o.Keys, Owner: o.Owner}
	m.boxes[o.Name] = b
	return b, nil
}

func (m *fakeManager) CreateFrom(_ context.Context, o box.FromOptions) (box.Box, error) {
	if err := m.record("create %s from=%s keys=%d", o.Name, o.Snapshot, len(o.Keys)); err != nil {
		return box.Box{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.boxes[o.Name]; ok {
		return box.Box{}, fmt.Errorf("%q: %w", o.Name, box.ErrExists)
	}
	parent, _, ok := strings.Cut(strings.TrimPrefix(o.Snapshot, "box."), ".")
	if !ok || !strings.HasPrefix(o.Snapshot, "box.") {
		return box.Box{}, fmt.Errorf("no snapshot %q: %w", o.Snapshot, errdefs.ErrNotFound)
	}
	b := box.Box{Name: o.Name, State: box.StateRunning, Keys: o.Keys, Parent: parent, Snapshot: o.Snapshot}
	m.boxes[o.Name] = b
	return b, nil
}

func (m *fakeManager) Fork(_ context.Context, src string, names []string) ([]box.Box, error) {
	if err := m.record("fork %s %s", src, strings.Join(names, ",")); err != nil {
		return nil, err
	}
	parent, err := m.lookup(src)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []box.Box
	for _, n := range names {
		b := box.Box{Name: n, State: box.StateRunning, Parent: src, Owner: parent.Owner}
		m.boxes[n] = b
		out = append(out, b)
	}
	return out, nil
}

func (m *fakeManager) Start(_ context.Context, name string) (box.Box, error) {
	if err := m.record("start %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StateRunning)
}

func (m *fakeManager) Stop(_ context.Context, name string) (box.Box, error) {
	if err := m.record("stop %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StateStopped)
}

func (m *fakeManager) Pause(_ context.Context, name string) (box.Box, error) {
	if err := m.record("pause %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StatePaused)
}

func (m *fakeManager) Unpause(_ context.Context, name string) (box.Box, error) {
	if err := m.record("unpause %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StateRunning)
}

func (m *fakeManager) HibernateIfIdle(_ context.Context, name string, idle func() bool) (box.Box, bool, error) {
	if err := m.record("hibernate-if-idle %s", name); err != nil {
		return box.Box{}, false, err
	}
	if m.beforeIdleCheck != nil {
		m.beforeIdleCheck(name)
	}
	unlock := m.lockBox(name)
	defer unlock()
	b, err := m.lookup(name)
	if err != nil || b.State != box.StateRunning || !idle() {
		return b, false, err
	}
	if m.whileHibernating != nil {
		m.whileHibernating(name)
	}
	b, err = m.setState(name, box.StateHibernated)
	return b, err == nil, err
}

func (m *fakeManager) Hibernate(_ context.Context, name string) (box.Box, error) {
	if err := m.record("hibernate %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StateHibernated)
}

func (m *fakeManager) Resume(_ context.Context, name string) (box.Box, error) {
	if err := m.record("resume %s", name); err != nil {
		return box.Box{}, err
	}
	return m.setState(name, box.StateRunning)
}

func (m *fakeManager) Snapshot(_ context.Context, name, snap string) (snapshotter.Snapshot, error) {
	if err := m.record("snapshot %s %s", name, snap); err != nil {
		return snapshotter.Snapshot{}, err
	}
	if _, err := m.lookup(name); err != nil {
		return snapshotter.Snapshot{}, err
	}
	return snapshotter.Snapshot{Name: "box." + name + "." + snap}, nil
}

func (m *fakeManager) Promote(_ context.Context, name, fork string) (box.Box, string, error) {
	if err := m.record("promote %s %s", name, fork); err != nil {
		return box.Box{}, "", err
	}
	if _, err := m.lookup(name); err != nil {
		return box.Box{}, "", err
	}
	f, err := m.lookup(fork)
	if err != nil {
		return box.Box{}, "", err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.boxes, fork)
	f.Name = name
	m.boxes[name] = f
	return f, "box." + name + ".1-promoted", nil
}

func (m *fakeManager) Remove(_ context.Context, name string) error {
	if err := m.record("remove %s", name); err != nil {
		return err
	}
	if _, err := m.lookup(name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.boxes, name)
	return nil
}

func (m *fakeManager) Exec(_ context.Context, name string, cmd agent.Command) (int, error) {
	stdin, _ := io.ReadAll(cmd.Stdin)
	if err := m.record("exec %s %s stdin=%q", name, strings.Join(cmd.Args, " "), stdin); err != nil {
		return 0, err
	}
	// Reaching the box takes its lock, and resumes a hibernated box.
	unlock := m.lockBox(name)
	b, err := m.lookup(name)
	if err == nil && b.State == box.StateHibernated {
		_, err = m.setState(name, box.StateRunning)
	}
	unlock()
	if err != nil {
		return 0, err
	}
	if m.execStarted != nil {
		m.execStarted <- struct{}{}
		<-m.execRelease
	}
	_, _ = io.WriteString(cmd.Stdout, m.execOut)
	_, _ = io.WriteString(cmd.Stderr, "err")
	return m.execCode, nil
}

// PutTree records the files of hostDir, which must exist while it runs.
func (m *fakeManager) PutTree(_ context.Context, name, hostDir, guestDir string) error {
	entries, err := os.ReadDir(hostDir)
	if err != nil {
		return err
	}
	var files []string
	for _, e := range entries {
		files = append(files, e.Name())
	}
	if err := m.record("put %s %s %s", name, strings.Join(files, ","), guestDir); err != nil {
		return err
	}
	_, err = m.lookup(name)
	return err
}

func (m *fakeManager) SetLabel(name, key, value string) error {
	if err := m.record("label %s %s=%s", name, key, value); err != nil {
		return err
	}
	_, err := m.lookup(name)
	return err
}

func (m *fakeManager) RemoveTree(_ context.Context, name, guestDir string) error {
	if err := m.record("remove-tree %s %s", name, guestDir); err != nil {
		return err
	}
	_, err := m.lookup(name)
	return err
}

func (m *fakeManager) lastCall() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.calls) == 0 {
		return ""
	}
	return m.calls[len(m.calls)-1]
}

// fakeGraph is the test double of the snapshot graph: a fixed list, and
// the names each Report was asked for.
type fakeGraph struct {
	mu      sync.Mutex
	snaps   []snapshotter.Snapshot
	reports [][]string
	gcs     []float64 // the thresholds GC was called with
	// compacts counts Compact calls; left is how many packs remain to
	// compact, one a call.
	compacts, left int
	compactOpts    []cas.CompactOptions // the options Compact was called with
}

func (s *fakeGraph) List() ([]snapshotter.Snapshot, error) { return s.snaps, nil }

func (s *fakeGraph) GC(_ context.Context, opts cas.GCOptions) (cas.GCStats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gcs = append(s.gcs, opts.Threshold)
	return cas.GCStats{BytesFreed: 4096, PacksDeleted: 1}, nil
}

func (s *fakeGraph) Compact(_ context.Context, opts cas.CompactOptions) (cas.CompactStats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.compacts++
	s.compactOpts = append(s.compactOpts, opts)
	if s.left == 0 {
		return cas.CompactStats{}, nil
	}
	s.left--
	return cas.CompactStats{PacksCompacted: 1, PacksLeft: s.left}, nil
}

func (s *fakeGraph) Report(_ context.Context, names ...string) (snapshotter.Report, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reports = append(s.reports, names)
	return snapshotter.Report{Snapshots: len(names)}, nil
}

// serve runs srv's API on a socket under a new root and returns a client
// of it.
func serve(t *testing.T, srv *Server) *Client {
	t.Helper()
	root := shortTempDir(t)
	l, err := listenSocket(SocketPath(root))
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(l)
	t.Cleanup(func() { hs.Close() })
	return NewClient(root)
}

// shortTempDir returns a temporary folder with a path short enough for a
// unix socket (t.TempDir's may not be).
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "boxd-daemon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func newTestServer(m Manager, g Graph) *Server {
	return NewServer(context.Background(), Options{Manager: m, Graph: g, Info: Info{SSHAddr: "127.0.0.1:2222"}})
}

func TestRoutes(t *testing.T) {
	for _, tc := range []struct {
		method, path, body string
		status             int
		category           string // of an error answer
		call               string // the manager's last call, "" for none
	}{
		{"GET", "/v1/info", "", 200, "", ""},
		{"GET", "/v1/boxes", "", 200, "", "list"},
		{"POST", "/v1/boxes", `{"name":"new","memory":134217728,"cpus":2,"keys":["` + testKey + `"]}`, 200, "", "create new image= memory=134217728 cpus=2 keys=1"},
		{"POST", "/v1/boxes", `{"name":"dev"}`, 409, "already_exists", "create dev image= memory=0 cpus=0 keys=0"},
		{"POST", "/v1/boxes", `{"name":"Bad_Name"}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes", `{"name":"new","keys":["not a key"]}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes", `{"name":"new","colour":"red"}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes", `{"name":`, 400, "invalid_argument", ""},
		// The manager chooses the runner (box.ChooseRunner); the API passes it on.
		{"POST", "/v1/boxes", `{"name":"new","runner":"qemu"}`, 200, "", "create new image= memory=0 cpus=0 keys=0 runner=qemu"},
		{"POST", "/v1/boxes", `{"name":"new","runner":"auto"}`, 200, "", "create new image= memory=0 cpus=0 keys=0 runner=auto"},
		{"POST", "/v1/boxes", `{"name":"new","runner":"kvm"}`, 200, "", "create new image= memory=0 cpus=0 keys=0 runner=kvm"},
		{"POST", "/v1/boxes", `{"name":"new","from":"box.dev.s1","keys":["` + testKey + `"]}`, 200, "", "create new from=box.dev.s1 keys=1"},
		{"POST", "/v1/boxes", `{"name":"new","from":"image.x"}`, 404, "not_found", "create new from=image.x keys=0"},
		{"POST", "/v1/boxes", `{"name":"new","from":"box.dev.s1","image":"debian-bookworm"}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes", `{"name":"new","from":"box.dev.s1","memory":134217728}`, 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/dev", "", 200, "", "get dev"},
		{"GET", "/v1/boxes/nope", "", 404, "not_found", "get nope"},
		{"GET", "/v1/boxes/-x-", "", 400, "invalid_argument", ""},
		{"DELETE", "/v1/boxes/dev", "", 200, "", "remove dev"},
		{"DELETE", "/v1/boxes/nope", "", 404, "not_found", "remove nope"},
		{"POST", "/v1/boxes/dev/fork", `{"names":["a-1","a-2"]}`, 200, "", "fork dev a-1,a-2"},
		{"POST", "/v1/boxes/nope/fork", `{"names":["a"]}`, 404, "not_found", "fork nope a"},
		{"POST", "/v1/boxes/dev/fork", `{"names":[]}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes/dev/fork", `{"names":["A"]}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes/dev/hibernate", `{}`, 200, "", "hibernate dev"},
		{"POST", "/v1/boxes/dev/resume", `{}`, 200, "", "resume dev"},
		{"POST", "/v1/boxes/dev/start", ``, 200, "", "start dev"},
		{"POST", "/v1/boxes/dev/stop", `{}`, 200, "", "stop dev"},
		{"POST", "/v1/boxes/dev/pause", `{}`, 200, "", "pause dev"},
		{"POST", "/v1/boxes/nope/pause", `{}`, 404, "not_found", "pause nope"},
		{"POST", "/v1/boxes/dev/unpause", `{}`, 200, "", "unpause dev"},
		{"POST", "/v1/boxes/nope/stop", `{}`, 404, "not_found", "stop nope"},
		{"POST", "/v1/boxes/dev/snapshot", `{"name":"s1"}`, 200, "", "snapshot dev s1"},
		{"POST", "/v1/boxes/dev/snapshot", `{}`, 200, "", "snapshot dev "},
		{"POST", "/v1/boxes/dev/snapshot", `{"name":"a/b"}`, 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/dev/snapshots", "", 200, "", "get dev"},
		{"GET", "/v1/boxes/nope/snapshots", "", 404, "not_found", "get nope"},
		{"GET", "/v1/snapshots", "", 200, "", "list"},
		{"POST", "/v1/boxes/dev/exec", `{"args":["echo","hi"],"stdin":"aW4="}`, 200, "", `exec dev echo hi stdin="in"`},
		{"POST", "/v1/boxes/dev/exec", `{"args":[]}`, 400, "invalid_argument", ""},
		{"POST", "/v1/boxes/nope/exec", `{"args":["true"]}`, 404, "not_found", `exec nope true stdin=""`},
		{"POST", "/v1/boxes/dev/exec", `{"args":["true"],"rows":-1}`, 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/nope/logs", "", 404, "not_found", "console nope"},
		{"GET", "/v1/boxes/nope/logs?follow=1&tail=3", "", 404, "not_found", "console nope"},
		{"GET", "/v1/boxes/-x-/logs", "", 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/dev/logs?tail=-1", "", 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/dev/logs?tail=all", "", 400, "invalid_argument", ""},
		{"GET", "/v1/boxes/dev/logs?follow=maybe", "", 400, "invalid_argument", ""},
		{"POST", "/v1/boxes/dev/logs", "", 404, "not_found", ""},
		{"GET", "/v1/report", "", 200, "", "list"},
		{"GET", "/v1/report?box=dev", "", 200, "", "get dev"},
		{"GET", "/v1/report?box=nope", "", 404, "not_found", "get nope"},
		{"GET", "/v1/boxes/dev/hibernate", "", 404, "not_found", ""},
		{"PUT", "/v1/boxes", "", 404, "not_found", ""},
		{"GET", "/v2/whatever", "", 404, "not_found", ""},
	} {
		t.Run(tc.method+" "+tc.path+" "+tc.body, func(t *testing.T) {
			m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
			c := serve(t, newTestServer(m, &fakeGraph{}))
			req, err := http.NewRequest(tc.method, "http://boxd"+tc.path, strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := c.hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, data)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			if tc.category != "" {
				var eb errorBody
				if err := json.Unmarshal(data, &eb); err != nil || eb.Category != tc.category || eb.Error == "" {
					t.Errorf("error body %s (%v), want category %s", data, err, tc.category)
				}
			} else if !json.Valid(data) {
				t.Errorf("answer is not JSON: %s", data)
			}
			if got := m.lastCall(); got != tc.call {
				t.Errorf("manager's last call %q, want %q", got, tc.call)
			}
		})
	}
}

func TestCategoryStatus(t *testing.T) {
	for _, tc := range []struct {
		err      error
		category string
		status   int
	}{
		{fmt.Errorf("x: %w", errdefs.ErrNotFound), "not_found", 404},
		{box.ErrExists, "already_exists", 409},
		{fmt.Errorf("bad: %w", errdefs.ErrInvalidArgument), "invalid_argument", 400},
		{box.ErrInvalidState, "failed_precondition", 409},
		{fmt.Errorf("busy: %w", errdefs.ErrUnavailable), "unavailable", 503},
		{fmt.Errorf("hash: %w", errdefs.ErrDataLoss), "data_loss", 500},
		{fmt.Errorf("full: %w", errdefs.ErrResourceExhausted), "resource_exhausted", 500},
		{errcat.NotSupported("no kvm"), "not_supported", 501},
		{fmt.Errorf("no access: %w", errdefs.ErrPermissionDenied), "permission_denied", 403},
		{fmt.Errorf("open disk: %w", fs.ErrNotExist), "not_found", 404},
		{fmt.Errorf("open /dev/kvm: %w", fs.ErrPermission), "permission_denied", 403},
		{errors.New("qemu died"), "unknown", 500},
	} {
		cat, status := Category(tc.err)
		if cat != tc.category || status != tc.status {
			t.Errorf("Category(%v) = %s, %d; want %s, %d", tc.err, cat, status, tc.category, tc.status)
		}
	}
}

func TestRemoteError(t *testing.T) {
	for _, tc := range []struct {
		status   int
		body     errorBody
		want     error // nil: no category
		category string
	}{
		{404, errorBody{"no such box", "not_found"}, errdefs.ErrNotFound, "not_found"},
		{409, errorBody{"taken", "already_exists"}, errdefs.ErrAlreadyExists, "already_exists"},
		{409, errorBody{"wrong state", "failed_precondition"}, errdefs.ErrFailedPrecondition, "failed_precondition"},
		{400, errorBody{"bad", "invalid_argument"}, errdefs.ErrInvalidArgument, "invalid_argument"},
		{503, errorBody{"busy", "unavailable"}, errdefs.ErrUnavailable, "unavailable"},
		{500, errorBody{"damaged", "data_loss"}, errdefs.ErrDataLoss, "data_loss"},
		{500, errorBody{"full", "resource_exhausted"}, errdefs.ErrResourceExhausted, "resource_exhausted"},
		{500, errorBody{"boom", "unknown"}, nil, "unknown"},
		{501, errorBody{"no kvm", "not_supported"}, errdefs.ErrNotImplemented, "not_supported"},
		// Without a category (not the API's JSON), the status decides.
		{404, errorBody{}, errdefs.ErrNotFound, "not_found"},
		{400, errorBody{}, errdefs.ErrInvalidArgument, "invalid_argument"},
		{405, errorBody{}, errdefs.ErrInvalidArgument, "invalid_argument"},
		{409, errorBody{}, errdefs.ErrFailedPrecondition, "failed_precondition"},
		{503, errorBody{}, errdefs.ErrUnavailable, "unavailable"},
		{501, errorBody{}, errdefs.ErrNotImplemented, "not_supported"},
		{403, errorBody{"no access", "permission_denied"}, errdefs.ErrPermissionDenied, "permission_denied"},
		{403, errorBody{}, errdefs.ErrPermissionDenied, "permission_denied"},
		{500, errorBody{}, nil, "unknown"},
		{404, errorBody{"gone", "a_future_category"}, errdefs.ErrNotFound, "not_found"},
		{502, errorBody{}, nil, "unknown"},
	} {
		e := remoteError(tc.status, tc.body)
		if tc.want != nil && !errors.Is(e, tc.want) {
			t.Errorf("%d %+v: %v does not match %v", tc.status, tc.body, e, tc.want)
		}
		if tc.want == nil && e.Unwrap() != nil {
			t.Errorf("%d %+v: category %v, want none", tc.status, tc.body, e.Unwrap())
		}
		if e.Category != tc.category {
			t.Errorf("%d %+v: category %q, want %q", tc.status, tc.body, e.Category, tc.category)
		}
		if tc.body.Error != "" && e.Error() != tc.body.Error {
			t.Errorf("message %q, want %q", e.Error(), tc.body.Error)
		}
		if e.Error() == "" {
			t.Errorf("%d: empty message", tc.status)
		}
	}
}

// TestClientErrors checks that every category the manager returns comes
// out of the client as the same category with the same message.
func TestClientErrors(t *testing.T) {
	for _, cat := range []error{errdefs.ErrNotFound, errdefs.ErrAlreadyExists, errdefs.ErrInvalidArgument, errdefs.ErrFailedPrecondition, errdefs.ErrUnavailable, errdefs.ErrDataLoss, errdefs.ErrResourceExhausted, errdefs.ErrNotImplemented, errdefs.ErrPermissionDenied} {
		m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
		m.err = fmt.Errorf("box dev went wrong: %w", cat)
		c := serve(t, newTestServer(m, &fakeGraph{}))
		_, err := c.Hibernate(context.Background(), "dev")
		if !errors.Is(err, cat) {
			t.Errorf("%v: client error %v does not match", cat, err)
		}
		if err == nil || err.Error() != m.err.Error() {
			t.Errorf("%v: client error %q, want %q", cat, err, m.err)
		}
	}
}

func TestClientRoundTrip(t *testing.T) {
	ctx := context.Background()
	m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning, Snapshot: "box.dev.2-snap"})
	m.execOut, m.execCode = "out\x00bytes", 3
	st := &fakeGraph{snaps: []snapshotter.Snapshot{
		{Name: "image.debian"},
		{Name: "box.dev.1-hibernate", Parent: "image.debian", Labels: map[string]string{"boxd.box": "dev"}},
		{Name: "box.dev.2-snap", Parent: "box.dev.1-hibernate"},
		{Name: "box.other.1", Parent: "box.dev.2-snap", Labels: map[string]string{"boxd.box": "other"}},
	}}
	c := serve(t, newTestServer(m, st))

	if i, err := c.Info(ctx); err != nil || i.SSHAddr != "127.0.0.1:2222" {
		t.Fatalf("info %+v, %v", i, err)
	}
	bx, err := c.Create(ctx, CreateRequest{Name: "new", Memory: 256 << 20, CPUs: 2, Keys: []string{testKey}})
	if err != nil || bx.Name != "new" || bx.Memory != 256<<20 || bx.CPUs != 2 || len(bx.Keys) != 1 {
		t.Fatalf("create: %+v, %v", bx, err)
	}
	boxes, err := c.List(ctx)
	if err != nil || len(boxes) != 2 {
		t.Fatalf("list: %+v, %v", boxes, err)
	}
	forks, err := c.Fork(ctx, "dev", []string{"f-1", "f-2"})
	if err != nil || len(forks) != 2 || forks[1].Parent != "dev" {
		t.Fatalf("fork: %+v, %v", forks, err)
	}
	if bx, err := c.Hibernate(ctx, "dev"); err != nil || bx.State != box.StateHibernated {
		t.Fatalf("hibernate: %+v, %v", bx, err)
	}
	if sn, err := c.Snapshot(ctx, "dev", "s1"); err != nil || sn.Name != "box.dev.s1" {
		t.Fatalf("snapshot: %+v, %v", sn, err)
	}
	res, err := c.Exec(ctx, "dev", []string{"cat"}, []byte("in\x00put"))
	if err != nil || res.ExitCode != 3 || string(res.Stdout) != "out\x00bytes" || string(res.Stderr) != "err" {
		t.Fatalf("exec: %+v, %v", res, err)
	}
	if got := m.lastCall(); got != `exec dev cat stdin="in\x00put"` {
		t.Errorf("exec call %s", got)
	}

	tree, err := c.Snapshots(ctx, "dev")
	if err != nil {
		t.Fatal(err)
	}
	if len(tree) != 1 || tree[0].Name != "box.dev.1-hibernate" || tree[0].Parent != "image.debian" ||
		len(tree[0].Children) != 1 || tree[0].Children[0].Name != "box.dev.2-snap" || !tree[0].Children[0].Current || tree[0].Current {
		b, _ := json.Marshal(tree)
		t.Errorf("snapshot tree %s", b)
	}
	all, err := c.AllSnapshots(ctx)
	if err != nil || len(all) != 4 {
		t.Fatalf("all snapshots: %+v, %v", all, err)
	}
	for _, bs := range all {
		if bs.Snapshots == nil {
			t.Errorf("box %s: nil snapshots", bs.Box)
		}
	}

	rep, err := c.Report(ctx, "dev", "new")
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Boxes) != 2 || rep.Boxes[0].Box != "dev" || len(rep.Boxes[0].Snapshots) != 2 || len(rep.Boxes[1].Snapshots) != 0 || rep.Total.Snapshots != 2 {
		t.Errorf("report %+v", rep)
	}
	// A box without snapshots must not ask for the report of everything.
	want := [][]string{{"box.dev.1-hibernate", "box.dev.2-snap"}, {"box.dev.1-hibernate", "box.dev.2-snap"}}
	if !reflect.DeepEqual(st.reports, want) {
		t.Errorf("reports asked %q, want %q", st.reports, want)
	}

	if err := c.Remove(ctx, "new"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "new"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("get after remove: %v", err)
	}

	// The store's gc, through the daemon that owns it.
	gc, err := c.GC(ctx, 0.25)
	if err != nil || gc.BytesFreed != 4096 || gc.PacksDeleted != 1 {
		t.Fatalf("gc: %+v, %v", gc, err)
	}
	if _, err := c.GC(ctx, 1.5); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("gc with threshold 1.5: %v", err)
	}
	if !reflect.DeepEqual(st.gcs, []float64{0.25}) {
		t.Errorf("gc thresholds %v, want [0.25]", st.gcs)
	}
}

func TestClientNotRunning(t *testing.T) {
	root := shortTempDir(t)
	check := func(what string) {
		t.Helper()
		_, err := NewClient(root).List(context.Background())
		want := fmt.Sprintf("boxd daemon is not running on %s (start it with: boxd daemon --root %s)", root, root)
		if err == nil || err.Error() != want {
			t.Fatalf("%s: %v, want %q", what, err, want)
		}
		if !errors.Is(err, errdefs.ErrUnavailable) || errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v matches the wrong categories", what, err)
		}
		var nr *NotRunningError
		if !errors.As(err, &nr) || nr.Root != root {
			t.Errorf("%s: %#v", what, err)
		}
	}
	check("no socket")

	// A socket left by a daemon that died: nobody accepts on it.
	l, err := net.Listen("unix", SocketPath(root))
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	check("stale socket")
}

func TestListenSocket(t *testing.T) {
	root := shortTempDir(t)
	path := SocketPath(root)
	// A stale socket is replaced.
	old, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	old.(*net.UnixListener).SetUnlinkOnClose(false)
	old.Close()
	l, err := listenSocket(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket, 0600", st.Mode())
	}
	if m, _ := filepath.Glob(path + ".*"); len(m) != 0 {
		t.Errorf("left behind: %v", m)
	}
	// Something that is not a socket is not removed.
	other := filepath.Join(root, "file")
	if err := os.WriteFile(other, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := listenSocket(other); err == nil {
		t.Error("listened over a regular file")
	}
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestHibernateIdle(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	m := newFakeManager(
		box.Box{Name: "idle", State: box.StateRunning},
		box.Box{Name: "ssh", State: box.StateRunning},
		box.Box{Name: "exec", State: box.StateRunning},
		box.Box{Name: "paused", State: box.StatePaused},
		box.Box{Name: "stopped", State: box.StateStopped},
	)
	srv := NewServer(ctx, Options{Manager: m, Graph: &fakeGraph{}, Now: clock.Now})
	const idle = 5 * time.Minute

	// First sight: every box counts as used now.
	if got, err := srv.HibernateIdle(ctx, idle); err != nil || len(got) != 0 {
		t.Fatalf("first pass hibernated %v, %v", got, err)
	}
	// An SSH connection through the front door holds its box while it lasts.
	b := &backend{mgr: clientsOf(m), srv: srv}
	sshCtx, disconnect := context.WithCancel(ctx)
	if _, err := b.Connect(sshCtx, "ssh"); err == nil {
		t.Fatal("connect to a box without an agent succeeded")
	}
	// So does an exec in progress.
	m.execStarted, m.execRelease = make(chan struct{}), make(chan struct{})
	c := serve(t, srv)
	execDone := make(chan error, 1)
	go func() {
		_, err := c.Exec(ctx, "exec", []string{"sleep", "1h"}, nil)
		execDone <- err
	}()
	<-m.execStarted

	clock.Advance(idle)
	got, err := srv.HibernateIdle(ctx, idle)
	if err != nil || !reflect.DeepEqual(got, []string{"idle"}) {
		t.Fatalf("hibernated %v, %v; want [idle]", got, err)
	}
	if bx, _ := m.lookup("paused"); bx.State != box.StatePaused {
		t.Errorf("paused box is %s", bx.State)
	}

	// Once the session and the exec end, their boxes are idle from then.
	disconnect()
	close(m.execRelease)
	if err := <-execDone; err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.activeCount("ssh") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the SSH connection's end was not noticed")
		}
		time.Sleep(time.Millisecond)
	}
	clock.Advance(idle - time.Second)
	if got, _ := srv.HibernateIdle(ctx, idle); len(got) != 0 {
		t.Errorf("hibernated %v a second early", got)
	}
	clock.Advance(time.Second)
	got, _ = srv.HibernateIdle(ctx, idle)
	slices.Sort(got)
	if !reflect.DeepEqual(got, []string{"exec", "ssh"}) {
		t.Errorf("hibernated %v, want [exec ssh]", got)
	}
}

// TestHibernateIdleRace checks that a use of a box that arrives while the
// idle loop hibernates it is never lost, at either moment it can arrive:
// after the loop's first look found the box idle, or once the loop has
// decided, under the box's lock, to hibernate it.
// TestHibernateIdleBusyCPU keeps a box that works on its own (more than a
// quarter of a CPU between two looks) running, though nobody uses it, and
// hibernates it once it quiets down.
func TestHibernateIdleBusyCPU(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	m := newFakeManager(box.Box{Name: "busy", State: box.StateRunning}, box.Box{Name: "quiet", State: box.StateRunning})
	srv := NewServer(ctx, Options{Manager: m, Graph: &fakeGraph{}, Now: clock.Now})
	const idle = 5 * time.Minute
	used := map[string]time.Duration{}
	pass := func(step time.Duration, share map[string]float64) []string {
		t.Helper()
		clock.Advance(step)
		for n, f := range share {
			used[n] += time.Duration(f * float64(step))
			m.setCPU(n, used[n])
		}
		got, err := srv.HibernateIdle(ctx, idle)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	pass(0, map[string]float64{"busy": 0, "quiet": 0}) // first sight
	for i := range 12 {                                // 6 minutes: busy at 90%, quiet at 2%
		if got := pass(30*time.Second, map[string]float64{"busy": 0.9, "quiet": 0.02}); len(got) != 0 {
			if i < 9 || len(got) != 1 || got[0] != "quiet" {
				t.Fatalf("pass %d hibernated %v", i, got)
			}
		}
	}
	if bx, _ := m.Get("quiet"); bx.State != box.StateHibernated {
		t.Fatalf("the quiet box is %s after 6 idle minutes", bx.State)
	}
	if bx, _ := m.Get("busy"); bx.State != box.StateRunning {
		t.Fatalf("the busy box is %s: its CPU use did not count", bx.State)
	}
	// It quiets down: idle time counts from its last busy look.
	for range 11 {
		pass(30*time.Second, map[string]float64{"busy": 0.01})
	}
	if bx, _ := m.Get("busy"); bx.State != box.StateHibernated {
		t.Fatalf("the busy box is %s after it quieted down for 5.5 minutes", bx.State)
	}
}

func TestHibernateIdleRace(t *testing.T) {
	ctx := context.Background()
	clock := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	m := newFakeManager(box.Box{Name: "dev", State: box.StateRunning})
	m.execOut, m.execCode = "done", 7
	srv := NewServer(ctx, Options{Manager: m, Graph: &fakeGraph{}, Now: clock.Now})
	c := serve(t, srv)
	const idle = 5 * time.Minute
	if got, err := srv.HibernateIdle(ctx, idle); err != nil || len(got) != 0 {
		t.Fatalf("first pass hibernated %v, %v", got, err)
	}
	execDone := make(chan execOutcome, 1)
	var out strings.Builder
	startExec := func() {
		go func() {
			code, err := c.ExecStream(ctx, "dev", ExecOptions{Args: []string{"true"}, Stdout: &out})
			execDone <- execOutcome{code, err}
		}()
	}
	checkExec := func(what string) {
		t.Helper()
		if r := <-execDone; r.err != nil || r.code != 7 || out.String() != "done" {
			t.Fatalf("%s: the exec got exit %d, %v, %q", what, r.code, r.err, out.String())
		}
		out.Reset()
	}

	// 1. An exec arrives after the first look found the box idle and
	// reaches the box before the decision is made again: it keeps the box.
	clock.Advance(idle)
	m.execStarted, m.execRelease = make(chan struct{}), make(chan struct{})
	m.beforeIdleCheck = func(string) {
		startExec()
		<-m.execStarted // the exec is in the box
	}
	got, err := srv.HibernateIdle(ctx, idle)
	if err != nil || len(got) != 0 {
		t.Fatalf("hibernated %v (%v) under a running exec", got, err)
	}
	if bx, _ := m.lookup("dev"); bx.State != box.StateRunning {
		t.Fatalf("the box is %s under a running exec", bx.State)
	}
	close(m.execRelease)
	checkExec("an exec that came after the first look")
	m.beforeIdleCheck, m.execStarted, m.execRelease = nil, nil, nil

	// 2. An exec arrives once the hibernation is decided: it waits for the
	// box's lock, then finds the box hibernated and resumes it.
	clock.Advance(idle)
	m.whileHibernating = func(string) {
		startExec()
		// Counted as a use before it asks for the box; it cannot have the
		// box while the lock is held.
		for srv.activeCount("dev") == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	got, err = srv.HibernateIdle(ctx, idle)
	if err != nil || !reflect.DeepEqual(got, []string{"dev"}) {
		t.Fatalf("hibernated %v, %v; want [dev]", got, err)
	}
	checkExec("an exec that came during the hibernation")
	if bx, _ := m.lookup("dev"); bx.State != box.StateRunning {
		t.Errorf("the box is %s after the exec that came during its hibernation", bx.State)
	}
	m.whileHibernating = nil

	// The exec's end is a use: the box is idle again only idle later.
	clock.Advance(idle - time.Second)
	if got, _ := srv.HibernateIdle(ctx, idle); len(got) != 0 {
		t.Errorf("hibernated %v a second early", got)
	}
	clock.Advance(time.Second)
	if got, _ := srv.HibernateIdle(ctx, idle); !reflect.DeepEqual(got, []string{"dev"}) {
		t.Errorf("hibernated %v, want [dev]", got)
	}
}

func TestBackendAuthorizedKeys(t *testing.T) {
	ctx := context.Background()
	m := newFakeManager(
		box.Box{Name: "dev", Keys: []string{testKey}},
		box.Box{Name: "bad", Keys: []string{"nonsense"}},
	)
	b := &backend{mgr: clientsOf(m), srv: newTestServer(m, &fakeGraph{})}
	keys, err := b.AuthorizedKeys(ctx, "dev")
	if err != nil || len(keys) != 1 || keys[0].Type() != "ssh-ed25519" {
		t.Errorf("keys of dev: %v, %v", keys, err)
	}
	if _, err := b.AuthorizedKeys(ctx, "nope"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("keys of an unknown box: %v", err)
	}
	if _, err := b.AuthorizedKeys(ctx, "bad"); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("malformed keys: %v", err)
	}
}

// fakeClients gives the fake manager the backend's Client: there is no
// agent to reach.
type fakeClients struct{ *fakeManager }

func (f fakeClients) Client(_ context.Context, name string) (*agent.Client, error) {
	if _, err := f.lookup(name); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("box %s: no agent in the test double: %w", name, errdefs.ErrUnavailable)
}

func clientsOf(m *fakeManager) boxClients { return fakeClients{m} }

// activeCount is how many uses of box name are in progress.
func (s *Server) activeCount(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.active[name]
}
