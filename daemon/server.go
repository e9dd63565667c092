package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
)

// Manager is what the API needs of the box manager (*box.Manager).
type Manager interface {
	List() ([]box.Box, error)
	Get(name string) (box.Box, error)
	Create(ctx context.Context, opts box.CreateOptions) (box.Box, error)
	CreateFrom(ctx context.Context, opts box.FromOptions) (box.Box, error)
	Fork(ctx context.Context, src string, names []string) ([]box.Box, error)
	Start(ctx context.Context, name string) (box.Box, error)
	Stop(ctx context.Context, name string) (box.Box, error)
	Pause(ctx context.Context, name string) (box.Box, error)
	Unpause(ctx context.Context, name string) (box.Box, error)
	Hibernate(ctx context.Context, name string) (box.Box, error)
	// HibernateIfIdle hibernates box name if it is running and idle,
	// asked under the lock that every use of the box takes first, says it
	// is idle; it reports whether it did (see box.Manager.HibernateIfIdle).
	HibernateIfIdle(ctx context.Context, name string, idle func() bool) (box.Box, bool, error)
	Resume(ctx context.Context, name string) (box.Box, error)
	Snapshot(ctx context.Context, name, snap string) (snapshotter.Snapshot, error)
	Remove(ctx context.Context, name string) error
	// Promote makes fork, a fork of box name, the new name, keeping
	// name's state before as a snapshot it returns (see
	// box.Manager.Promote).
	Promote(ctx context.Context, name, fork string) (box.Box, string, error)
	Exec(ctx context.Context, name string, cmd agent.Command) (int, error)
	// Process starts or attaches to a kept process in box name, and the
	// methods after it act on them (see box.Manager.Process).
	Process(ctx context.Context, name string, spec agent.ProcessSpec, stdio agent.ProcessIO) (int, error)
	Processes(ctx context.Context, name string) ([]agent.ProcessInfo, error)
	SignalProcess(ctx context.Context, name, id string, sig int) error
	ResizeProcess(ctx context.Context, name, id string, rows, cols int) error
	CloseProcessStdin(ctx context.Context, name, id string) error
	ForgetProcess(ctx context.Context, name, id string) error
	// CPUTime is the CPU time box name's machine has used so far, if it
	// runs.
	CPUTime(name string) (time.Duration, bool)
	// ConsolePath is the file box name's console is appended to; it
	// exists once the box has run (see box.Manager.ConsolePath).
	ConsolePath(name string) (string, error)
	// Usage measures what the boxes named (every box with none) use of
	// the host (see box.Manager.Usage).
	Usage(ctx context.Context, names []string, opts box.UsageOptions) ([]box.Usage, error)
	// PutTree and RemoveTree put a host folder's tree in box name and
	// take it away (see box.Manager.PutTree).
	PutTree(ctx context.Context, name, hostDir, guestDir string) error
	RemoveTree(ctx context.Context, name, guestDir string) error
	// SetLabel sets or, with value "", removes a label of box name.
	SetLabel(name, key, value string) error
}

// Graph is what the API needs of the snapshot graph (*snapshotter.Graph).
type Graph interface {
	List() ([]snapshotter.Snapshot, error)
	Report(ctx context.Context, names ...string) (snapshotter.Report, error)
	// GC removes the chunks no snapshot references; it waits for
	// snapshots being written (the store's write lock) and is safe while
	// boxes run.
	GC(ctx context.Context, opts cas.GCOptions) (cas.GCStats, error)
	// Compact rewrites freshly written packs into smaller ones; it waits
	// for snapshots being written and is safe while boxes run.
	Compact(ctx context.Context, opts cas.CompactOptions) (cas.CompactStats, error)
}

// Body limits: a request's JSON, and what one exec keeps of each of its
// output streams.
const (
	maxRequestBody = 1 << 20
	maxExecBody    = 96 << 20 // stdin, base64 in JSON
	MaxExecOutput  = 64 << 20
)

// Server answers the API and keeps track of when each box was last used.
// Create it with NewServer.
type Server struct {
	mgr   Manager
	graph Graph
	info  Info
	log   *slog.Logger
	now   func() time.Time
	// ctx ends when the daemon shuts down; box operations run under it
	// rather than under their request, so a command interrupted while a
	// box boots does not leave the box half made.
	ctx context.Context
	// streaming ends when the daemon stops serving (EndStreams), or with
	// ctx: the event streams and follows of box logs in progress end with
	// it.
	streaming    context.Context
	endStreaming context.CancelFunc

	// mu protects the fields below.
	mu sync.Mutex
	// lastUse is when each box was last used: created, started, resumed,
	// an exec or an SSH connection ended.
	lastUse map[string]time.Time
	// active counts each box's execs and SSH connections in progress.
	active map[string]int
	// cpu is each running box's CPU time when HibernateIdle last looked.
	cpu     map[string]cpuSample
	busyCPU float64

	rootfs Rootfs

	// streams counts the exec streams in progress, which the HTTP server
	// no longer tracks once they are hijacked.
	streams sync.WaitGroup

	events *events.Exchange
	// keys are the registered keys: nil, none.
	keys *KeyRegistry

	images *imageBuilds

	// lastRequest is when the API last saw a request (Unix nanoseconds):
	// background compaction waits for a quiet spell.
	lastRequest atomic.Int64
}

// Options configure a Server.
type Options struct {
	Manager Manager
	Graph   Graph
	Info    Info
	Logger  *slog.Logger     // nil logs nothing
	Now     func() time.Time // nil means time.Now
	// BusyCPU is the share of one CPU above which a box counts as in use
	// for idle hibernation, measured between two looks (0 means
	// DefaultBusyCPU).
	BusyCPU float64
	// Events is where the box manager tells what happens: GET /v1/events
	// streams it, and a gc is told there.
	Events *events.Exchange
	// Keys are the keys registered for boxd's commands over SSH, served
	// on /v1/keys; requests for one of them (OwnerHeader) see its boxes
	// alone. nil: none, and such requests are refused.
	Keys *KeyRegistry
	// Images lists and builds images (GET and POST /v1/images); nil
	// refuses them.
	Images Images
	// Rootfs is the daemon's containerd snapshotter, whose root file
	// systems boxes can start from (CreateRequest.Rootfs) or be given
	// (POST /v1/boxes/{name}/rootfs); nil refuses both.
	Rootfs Rootfs
}

// DefaultBusyCPU is the CPU use above which a box with no exec and no SSH
// connection is still busy: a quarter of one CPU. An idle Linux guest
// under TCG uses a few per cent.
const DefaultBusyCPU = 0.25

// cpuSample is a box's CPU time at a moment.
type cpuSample struct {
	used time.Duration
	at   time.Time
}

// NewServer returns a server of the API. Box operations it starts are
// cancelled when ctx ends.
func NewServer(ctx context.Context, opts Options) *Server {
	s := &Server{
		mgr: opts.Manager, graph: opts.Graph, info: opts.Info, log: opts.Logger, now: opts.Now, ctx: ctx,
		lastUse: map[string]time.Time{}, active: map[string]int{}, cpu: map[string]cpuSample{}, busyCPU: opts.BusyCPU,
		events: opts.Events, keys: opts.Keys, rootfs: opts.Rootfs,
	}
	s.streaming, s.endStreaming = context.WithCancel(ctx)
	if s.busyCPU <= 0 {
		s.busyCPU = DefaultBusyCPU
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.images = newImageBuilds(ctx, opts.Images, s.log)
	return s
}

// Handler returns the API's routes.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/info", s.getInfo)
	mux.HandleFunc("GET /v1/boxes", s.listBoxes)
	mux.HandleFunc("POST /v1/boxes", s.createBox)
	mux.HandleFunc("GET /v1/boxes/{name}", s.getBox)
	mux.HandleFunc("DELETE /v1/boxes/{name}", s.removeBox)
	mux.HandleFunc("POST /v1/boxes/{name}/fork", s.forkBox)
	mux.HandleFunc("POST /v1/boxes/{name}/snapshot", s.snapshotBox)
	mux.HandleFunc("POST /v1/boxes/{name}/exec", s.execBox)
	mux.HandleFunc("POST /v1/boxes/{name}/promote", s.promoteBox)
	s.processRoutes(mux)
	mux.HandleFunc("GET /v1/boxes/{name}/logs", s.boxLogs)
	mux.HandleFunc("POST /v1/boxes/{name}/rootfs", s.addRootfs)
	mux.HandleFunc("DELETE /v1/boxes/{name}/rootfs/{id}", s.removeRootfs)
	for action, op := range map[string]func(context.Context, string) (box.Box, error){
		"start":     s.mgr.Start,
		"stop":      s.mgr.Stop,
		"pause":     s.mgr.Pause,
		"unpause":   s.mgr.Unpause,
		"hibernate": s.mgr.Hibernate,
		"resume":    s.mgr.Resume,
	} {
		mux.HandleFunc("POST /v1/boxes/{name}/"+action, func(w http.ResponseWriter, r *http.Request) { s.lifecycle(w, r, action, op) })
	}
	mux.HandleFunc("GET /v1/boxes/{name}/snapshots", s.boxSnapshots)
	mux.HandleFunc("GET /v1/snapshots", s.allSnapshots)
	mux.HandleFunc("GET /v1/report", s.report)
	mux.HandleFunc("GET /v1/stats", s.stats)
	mux.HandleFunc("POST /v1/gc", s.gc)
	mux.HandleFunc("POST /v1/compact", s.compact)
	mux.HandleFunc("GET /v1/events", s.streamEvents)
	mux.HandleFunc("GET /v1/keys", s.listKeys)
	mux.HandleFunc("POST /v1/keys", s.addKeys)
	mux.HandleFunc("DELETE /v1/keys/{fingerprint}", s.removeKey)
	mux.HandleFunc("GET /v1/images", s.listImages)
	mux.HandleFunc("POST /v1/images", s.buildImage)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		// Also what a known path with the wrong method gets: the
		// catch-all matches every method.
		s.fail(w, r, fmt.Errorf("the boxd daemon has no %s %s: %w", r.Method, r.URL.Path, errdefs.ErrNotFound))
	})
	return s.noteRequests(s.scoped(mux))
}

// opContext is the context of a box operation that request r started: it
// outlives the request, not the daemon.
func (s *Server) opContext(r *http.Request) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Server) reply(w http.ResponseWriter, v any) { writeJSON(w, http.StatusOK, v) }

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	cat, status := Category(err)
	if status == http.StatusInternalServerError {
		s.log.Error("api", "method", r.Method, "path", r.URL.Path, "err", err)
	} else {
		s.log.Debug("api", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	writeJSON(w, status, errorBody{Error: err.Error(), Category: cat})
}

// decode reads r's JSON body into v, refusing unknown fields.
func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if mbe := (*http.MaxBytesError)(nil); errors.As(err, &mbe) {
			return fmt.Errorf("request body over %d bytes: %w", mbe.Limit, errdefs.ErrInvalidArgument)
		}
		return fmt.Errorf("request body: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	if dec.More() {
		return fmt.Errorf("request body: more than one JSON value: %w", errdefs.ErrInvalidArgument)
	}
	return nil
}

// boxName returns the {name} of r's path, checked.
func boxName(r *http.Request) (string, error) {
	name := r.PathValue("name")
	return name, box.ValidateName(name)
}

func (s *Server) getInfo(w http.ResponseWriter, _ *http.Request) { s.reply(w, s.info) }

func (s *Server) listBoxes(w http.ResponseWriter, r *http.Request) {
	boxes, err := s.mgr.List()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, visibleBoxes(r, boxes))
}

func (s *Server) getBox(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	if err == nil {
		var bx box.Box
		if bx, err = s.lookup(r, name); err == nil {
			s.reply(w, bx)
			return
		}
	}
	s.fail(w, r, err)
}

func (s *Server) createBox(w http.ResponseWriter, r *http.Request) {
	var req CreateRequest
	if err := decode(w, r, maxRequestBody, &req); err != nil {
		s.fail(w, r, err)
		return
	}
	if err := checkNewName(req.Name); err != nil {
		s.fail(w, r, err)
		return
	}
	owner := ownerOf(r)
	if owner != "" && len(req.HostPorts) > 0 {
		s.fail(w, r, fmt.Errorf("host ports: a box made over SSH reaches no host port: %w", errdefs.ErrPermissionDenied))
		return
	}
	if owner != "" {
		if err := s.ownerCreate(owner, &req); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	if len(req.Keys) > 0 {
		if _, err := sshproxy.ParseAuthorizedKeys([]byte(strings.Join(req.Keys, "\n"))); err != nil {
			s.fail(w, r, fmt.Errorf("keys: %w", err))
			return
		}
	}
	if req.MaxForks < 0 || req.MaxForks > box.MaxMaxForks {
		s.fail(w, r, fmt.Errorf("max forks %d: want 1 to %d: %w", req.MaxForks, box.MaxMaxForks, errdefs.ErrInvalidArgument))
		return
	}
	if req.From != "" && (req.Image != "" || req.Memory != 0 || req.CPUs != 0) {
		s.fail(w, r, fmt.Errorf("a box made from snapshot %s has the snapshot's image, memory and vCPUs; give none of them: %w", req.From, errdefs.ErrInvalidArgument))
		return
	}
	if err := checkLabels(req.Labels); err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	var base string
	if req.Rootfs != "" {
		var err error
		if base, err = s.rootfsBase(ctx, req, owner); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	var bx box.Box
	var err error
	if req.From != "" {
		bx, err = s.mgr.CreateFrom(ctx, box.FromOptions{Name: req.Name, Snapshot: req.From, Keys: req.Keys, NoInside: req.NoInside, MaxForks: req.MaxForks, HostPorts: req.HostPorts, Labels: req.Labels})
	} else {
		bx, err = s.mgr.Create(ctx, box.CreateOptions{
			Name: req.Name, Image: req.Image, Memory: req.Memory, CPUs: req.CPUs, Keys: req.Keys, Runner: req.Runner,
			NoInside: req.NoInside, MaxForks: req.MaxForks, Owner: owner, HostPorts: req.HostPorts,
			BaseSnapshot: base, Labels: req.Labels,
		})
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.touch(bx.Name)
	s.reply(w, bx)
}

func (s *Server) removeBox(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	if err == nil {
		err = s.checkOwned(r, name)
	}
	if err == nil {
		ctx, cancel := s.opContext(r)
		err = s.mgr.Remove(ctx, name)
		cancel()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.forget(name)
	s.reply(w, map[string]string{"removed": name})
}

func (s *Server) promoteBox(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	var req PromoteRequest
	if err == nil {
		err = decode(w, r, maxRequestBody, &req)
	}
	if err == nil {
		err = box.ValidateName(req.Fork)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	bx, kept, err := s.mgr.Promote(ctx, name, req.Fork)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.forget(req.Fork)
	s.touch(name)
	s.reply(w, PromoteResult{Box: bx, Kept: kept})
}

func (s *Server) forkBox(w http.ResponseWriter, r *http.Request) {
	src, err := boxName(r)
	var req ForkRequest
	if err == nil {
		err = decode(w, r, maxRequestBody, &req)
	}
	if err == nil && len(req.Names) == 0 {
		err = fmt.Errorf("fork: no names for the new boxes: %w", errdefs.ErrInvalidArgument)
	}
	for _, n := range req.Names {
		if err == nil {
			err = checkNewName(n)
		}
	}
	if err == nil {
		err = s.checkOwned(r, src)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	boxes, err := s.mgr.Fork(ctx, src, req.Names)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	for _, bx := range boxes {
		s.touch(bx.Name)
	}
	s.reply(w, boxes)
}

func (s *Server) lifecycle(w http.ResponseWriter, r *http.Request, action string, op func(context.Context, string) (box.Box, error)) {
	name, err := boxName(r)
	if err == nil {
		err = s.checkOwned(r, name)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	bx, err := op(ctx, name)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if action == "start" || action == "resume" || action == "unpause" {
		s.touch(name)
	}
	s.reply(w, bx)
}

func (s *Server) snapshotBox(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	var req SnapshotRequest
	if err == nil {
		err = decode(w, r, maxRequestBody, &req)
	}
	if err == nil && req.Name != "" {
		err = snapshotter.ValidateName("box." + name + "." + req.Name)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	snap, err := s.mgr.Snapshot(ctx, name, req.Name)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, snap)
}

// limitedBuffer keeps the first max bytes written to it and drops the rest.
type limitedBuffer struct {
	bytes.Buffer
	max       int
	truncated bool
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - b.Len(); len(p) > room {
		p, b.truncated = p[:max(room, 0)], true
	}
	b.Buffer.Write(p)
	return n, nil
}

// execBox runs a command in a box: on the request's connection when the
// client asks to upgrade to ExecProtocol, else with its input and output
// in the JSON of the request and the answer.
func (s *Server) execBox(w http.ResponseWriter, r *http.Request) {
	if up := r.Header.Get("Upgrade"); up != "" {
		if !strings.EqualFold(up, ExecProtocol) {
			s.fail(w, r, fmt.Errorf("exec: unknown protocol %q to upgrade to; want %s: %w", up, ExecProtocol, errdefs.ErrInvalidArgument))
			return
		}
		s.execStream(w, r)
		return
	}
	name, req, err := readExecRequest(w, r, maxExecBody)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	res, err := s.execCollected(r.Context(), name, req)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, res)
}

// readExecRequest reads and checks the box name and the ExecRequest (of at
// most limit bytes) of an exec.
func readExecRequest(w http.ResponseWriter, r *http.Request, limit int64) (string, ExecRequest, error) {
	name, err := boxName(r)
	var req ExecRequest
	if err == nil {
		err = decode(w, r, limit, &req)
	}
	if err == nil {
		err = checkExec(req)
	}
	return name, req, err
}

// execCollected runs req in box name under ctx and collects its output, up
// to MaxExecOutput bytes of each stream.
func (s *Server) execCollected(ctx context.Context, name string, req ExecRequest) (ExecResult, error) {
	stdout, stderr := &limitedBuffer{max: MaxExecOutput}, &limitedBuffer{max: MaxExecOutput}
	done := s.begin(name)
	// The command runs under the request: a client that goes away ends it.
	code, err := s.mgr.Exec(ctx, name, agent.Command{
		Args: req.Args, Stdin: bytes.NewReader(req.Stdin), Stdout: stdout, Stderr: stderr,
		TTY: req.TTY, Rows: req.Rows, Cols: req.Cols, Env: req.Env,
	})
	done()
	if err != nil {
		return ExecResult{}, err
	}
	return ExecResult{ExitCode: code, Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Truncated: stdout.truncated || stderr.truncated}, nil
}

// checkExec checks an exec's command and terminal.
func checkExec(req ExecRequest) error {
	if len(req.Args) == 0 {
		return fmt.Errorf("exec: no command: %w", errdefs.ErrInvalidArgument)
	}
	if req.Rows < 0 || req.Cols < 0 || req.Rows > 0xffff || req.Cols > 0xffff {
		return fmt.Errorf("exec: a terminal of %d x %d: want 0 to 65535 rows and columns: %w", req.Rows, req.Cols, errdefs.ErrInvalidArgument)
	}
	for k := range req.Env {
		if !ValidEnvName(k) {
			return fmt.Errorf("exec: environment variable name %q: want letters, digits and '_', not starting with a digit: %w", k, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// envName matches the environment variable names an exec may set.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// ValidEnvName says whether k is a name an exec may set in the command's
// environment: letters, digits and '_', not starting with a digit.
func ValidEnvName(k string) bool { return envName.MatchString(k) }

// execStream runs a command whose streams travel on the request's
// connection, taken over from the HTTP server (see ExecProtocol).
func (s *Server) execStream(w http.ResponseWriter, r *http.Request) {
	name, req, err := s.readStreamRequest(w, r)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.takeOver(w, r, name, func(conn net.Conn, in *bufio.Reader) { s.runStream(conn, in, name, req) })
}

// takeOver takes request r's connection over from the HTTP server, answers
// 101 Switching Protocols and runs the stream of box name on it with run.
func (s *Server) takeOver(w http.ResponseWriter, r *http.Request, name string, run func(conn net.Conn, in *bufio.Reader)) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		s.fail(w, r, fmt.Errorf("this connection cannot be taken over for streaming: %w", errdefs.ErrInvalidArgument))
		return
	}
	// Counted before the connection is taken over, so that a daemon that
	// stops meanwhile waits for it.
	s.streams.Add(1)
	defer s.streams.Done()
	conn, in, ok := s.switchProtocols(hj, name)
	if !ok {
		return
	}
	defer conn.Close()
	run(conn, in)
}

// readStreamRequest reads and checks a streaming exec's request, before the
// connection is taken over, so that a refusal is an ordinary answer: a
// stream's input comes on the stream, and an unknown box is refused.
func (s *Server) readStreamRequest(w http.ResponseWriter, r *http.Request) (string, ExecRequest, error) {
	name, req, err := readExecRequest(w, r, maxRequestBody)
	if err == nil && len(req.Stdin) > 0 {
		err = fmt.Errorf("exec: a streaming exec's input comes on the stream, not in the request: %w", errdefs.ErrInvalidArgument)
	}
	if err == nil {
		// An unknown box is refused as an answer, not on the stream.
		_, err = s.mgr.Get(name)
	}
	return name, req, err
}

// switchProtocols takes the connection over from the HTTP server and
// answers 101 Switching Protocols on it; it reports whether the stream can
// begin.
func (s *Server) switchProtocols(hj http.Hijacker, name string) (net.Conn, *bufio.Reader, bool) {
	conn, rw, err := hj.Hijack()
	if err != nil {
		s.log.Warn("exec stream", "box", name, "err", err)
		return nil, nil, false
	}
	_ = conn.SetDeadline(time.Time{})
	if _, err := rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + ExecProtocol + "\r\n\r\n"); err != nil {
		conn.Close()
		return nil, nil, false
	}
	if err := rw.Flush(); err != nil {
		conn.Close()
		return nil, nil, false
	}
	return conn, rw.Reader, true
}

// runStream runs req in box name with its streams on conn (in reads the
// client's frames), and sends its exit status or error as the last frame.
func (s *Server) runStream(conn net.Conn, in *bufio.Reader, name string, req ExecRequest) {
	// The command ends when the daemon stops or the client goes away.
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	out := &frameWriter{w: conn}
	stdin, resize := s.followClient(ctx, cancel, in, name)
	defer stdin.Close()

	done := s.begin(name)
	code, err := s.mgr.Exec(ctx, name, agent.Command{
		Args: req.Args, Stdin: stdin, Stdout: out.stream(frameStdout), Stderr: out.stream(frameStderr),
		TTY: req.TTY, Rows: req.Rows, Cols: req.Cols, Resize: resize, Env: req.Env,
	})
	done()
	if err != nil {
		if ctx.Err() == nil {
			s.log.Debug("exec stream", "box", name, "err", err)
		}
		_ = out.frame(frameError, errorFrame(err))
		return
	}
	_ = out.frame(frameExit, exitFrame(code))
}

// followClient passes the client's frames from in on, in the background,
// as the command's stdin and window sizes; it calls cancel when the client
// goes away.
func (s *Server) followClient(ctx context.Context, cancel context.CancelFunc, in io.Reader, name string) (*io.PipeReader, <-chan agent.WindowSize) {
	stdin, stdinW := io.Pipe()
	resize := make(chan agent.WindowSize)
	go func() {
		err := readClientFrames(ctx, in, stdinW, resize)
		if ctx.Err() == nil && err != nil {
			s.log.Debug("exec stream: the client went away", "box", name, "err", err)
		}
		cancel()
	}()
	return stdin, resize
}

// readClientFrames passes the client's frames of an exec stream on: input
// to stdin, window sizes to resize, until the client goes away (an error)
// or ctx ends.
func readClientFrames(ctx context.Context, r io.Reader, stdin *io.PipeWriter, resize chan<- agent.WindowSize) error {
	var buf []byte
	for {
		kind, p, err := readFrame(r, &buf)
		if err != nil {
			_ = stdin.CloseWithError(err)
			return err
		}
		switch kind {
		case frameStdin:
			// Blocks until the command reads it. Input the command no
			// longer reads (it closed its stdin, or it is over) is dropped.
			_, _ = stdin.Write(p)
		case frameCloseStdin:
			_ = stdin.Close()
		case frameResize:
			if len(p) != 4 {
				err := fmt.Errorf("exec stream: a resize frame of %d bytes", len(p))
				_ = stdin.CloseWithError(err)
				return err
			}
			ws := agent.WindowSize{Rows: int(binary.BigEndian.Uint16(p)), Cols: int(binary.BigEndian.Uint16(p[2:]))}
			select {
			case resize <- ws:
			case <-ctx.Done():
				return nil
			}
		default:
			err := fmt.Errorf("exec stream: unknown frame kind %d", kind)
			_ = stdin.CloseWithError(err)
			return err
		}
	}
}

// WaitStreams waits until the exec streams in progress have ended, or ctx
// ends. The HTTP server's Shutdown does not wait for them.
func (s *Server) WaitStreams(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		s.streams.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// isBoxSnapshot reports whether snapshot sn belongs to box name: labelled
// for it by the box manager, or named after it.
func isBoxSnapshot(sn snapshotter.Snapshot, name string) bool {
	return sn.Labels[box.LabelBox] == name || strings.HasPrefix(sn.Name, "box."+name+".")
}

// snapshotTree arranges the snapshots of bx (from all, parents first) as a
// tree: its roots are the snapshots whose parents are not the box's.
func snapshotTree(all []snapshotter.Snapshot, bx box.Box) []*SnapshotNode {
	nodes := map[string]*SnapshotNode{}
	var roots []*SnapshotNode
	for _, sn := range all {
		if !isBoxSnapshot(sn, bx.Name) {
			continue
		}
		n := &SnapshotNode{Name: sn.Name, Parent: sn.Parent, Created: sn.Created, Labels: sn.Labels, Size: sn.Size(), Current: sn.Name == bx.Snapshot}
		nodes[sn.Name] = n
		if p := nodes[sn.Parent]; p != nil {
			p.Children = append(p.Children, n)
		} else {
			roots = append(roots, n)
		}
	}
	// A parent listed after its child (the graph lists parents first, so
	// this is defensive) still gets it.
	var kept []*SnapshotNode
	for _, n := range roots {
		if p := nodes[n.Parent]; p != nil && p != n {
			p.Children = append(p.Children, n)
			continue
		}
		kept = append(kept, n)
	}
	if kept == nil {
		kept = []*SnapshotNode{}
	}
	return kept
}

func (s *Server) boxSnapshots(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	var bx box.Box
	if err == nil {
		bx, err = s.lookup(r, name)
	}
	var all []snapshotter.Snapshot
	if err == nil {
		all, err = s.graph.List()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, snapshotTree(all, bx))
}

func (s *Server) allSnapshots(w http.ResponseWriter, r *http.Request) {
	boxes, err := s.mgr.List()
	var all []snapshotter.Snapshot
	if err == nil {
		all, err = s.graph.List()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := []BoxSnapshots{}
	for _, bx := range visibleBoxes(r, boxes) {
		out = append(out, BoxSnapshots{Box: bx.Name, Snapshots: snapshotTree(all, bx)})
	}
	s.reply(w, out)
}

// GCRequest is the body of POST /v1/gc.
type GCRequest struct {
	// Threshold is the share of a pack's bytes that must be garbage before
	// the pack is rewritten (0 means the store's default).
	Threshold float64 `json:"threshold,omitempty"`
}

// gc collects the store's garbage: what removed boxes and snapshots left.
func (s *Server) gc(w http.ResponseWriter, r *http.Request) {
	var req GCRequest
	if err := decode(w, r, maxRequestBody, &req); err != nil {
		s.fail(w, r, err)
		return
	}
	if req.Threshold < 0 || req.Threshold > 1 {
		s.fail(w, r, fmt.Errorf("gc threshold %g is outside (0, 1]: %w", req.Threshold, errdefs.ErrInvalidArgument))
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	began := time.Now()
	st, err := s.graph.GC(ctx, cas.GCOptions{Threshold: req.Threshold})
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.events.Publish(events.Event{Type: events.GC, Bytes: st.BytesFreed, Took: time.Since(began)})
	writeJSON(w, http.StatusOK, st)
}

// report answers the dedup report of the boxes named by ?box= (all boxes
// when none): each box's snapshots, then all of them together.
func (s *Server) report(w http.ResponseWriter, r *http.Request) {
	names := r.URL.Query()["box"]
	var boxes []box.Box
	var err error
	if len(names) == 0 {
		if boxes, err = s.mgr.List(); err == nil {
			boxes = visibleBoxes(r, boxes)
		}
	}
	for _, n := range names {
		var bx box.Box
		if err == nil {
			if err = box.ValidateName(n); err == nil {
				bx, err = s.lookup(r, n)
			}
		}
		boxes = append(boxes, bx)
	}
	var all []snapshotter.Snapshot
	if err == nil {
		all, err = s.graph.List()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	out := Report{Boxes: []BoxReport{}, Total: emptyReport()}
	var union []string
	for _, bx := range boxes {
		br := BoxReport{Box: bx.Name, Snapshots: []string{}, Report: emptyReport()}
		for _, sn := range all {
			if isBoxSnapshot(sn, bx.Name) {
				br.Snapshots = append(br.Snapshots, sn.Name)
			}
		}
		// Report of no names reports everything: a box without
		// snapshots keeps the empty report.
		if len(br.Snapshots) > 0 {
			if br.Report, err = s.graph.Report(r.Context(), br.Snapshots...); err != nil {
				s.fail(w, r, err)
				return
			}
			fillEmpty(&br.Report)
		}
		for _, n := range br.Snapshots {
			if !slices.Contains(union, n) {
				union = append(union, n)
			}
		}
		out.Boxes = append(out.Boxes, br)
	}
	if len(union) > 0 {
		if out.Total, err = s.graph.Report(r.Context(), union...); err != nil {
			s.fail(w, r, err)
			return
		}
		fillEmpty(&out.Total)
	}
	s.reply(w, out)
}

func emptyReport() snapshotter.Report {
	var r snapshotter.Report
	fillEmpty(&r)
	return r
}

// fillEmpty makes r's lists empty rather than null in JSON.
func fillEmpty(r *snapshotter.Report) {
	if r.Histogram == nil {
		r.Histogram = []snapshotter.RefBucket{}
	}
	if r.PerSnap == nil {
		r.PerSnap = []snapshotter.SnapshotReport{}
	}
}

// touch records a use of box name now.
func (s *Server) touch(name string) {
	s.mu.Lock()
	s.lastUse[name] = s.now()
	s.mu.Unlock()
}

// forget drops what the server knows of a removed box.
func (s *Server) forget(name string) {
	s.mu.Lock()
	delete(s.lastUse, name)
	if s.active[name] == 0 {
		delete(s.active, name)
	}
	s.mu.Unlock()
}

// begin records that box name is in use until the returned function is
// called (once; later calls do nothing). Call it before the use reaches
// the box (the manager's Client or Exec): HibernateIdle relies on it.
func (s *Server) begin(name string) func() {
	s.mu.Lock()
	s.active[name]++
	s.lastUse[name] = s.now()
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.active[name]--
			if s.active[name] <= 0 {
				delete(s.active, name)
			}
			s.lastUse[name] = s.now()
			s.mu.Unlock()
		})
	}
}

// idleFor returns how long box name has been idle, zero while it is in use.
// A box the server has not seen used counts as used now.
func (s *Server) idleFor(name string) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active[name] > 0 {
		return 0
	}
	now := s.now()
	last, ok := s.lastUse[name]
	if !ok {
		s.lastUse[name] = now
		return 0
	}
	return now.Sub(last)
}

// HibernateIdle hibernates every running box that has been idle (no exec,
// no SSH connection through the front door, and no more than BusyCPU of a
// CPU used between two calls) for at least idle, and returns their names. A failure to hibernate one box is logged, not
// returned; the box keeps running and is tried again on the next call.
//
// Whether a box is idle is decided again under the box's lock, which
// every use takes before it reaches the box, and the box is hibernated
// under the same hold (box.Manager.HibernateIfIdle). Uses are counted
// (begin) before they take the box, so one that arrives after the first
// look is either seen there and keeps the box running, or waits for the
// lock and resumes the box: it is never cut off by the hibernation.
func (s *Server) HibernateIdle(ctx context.Context, idle time.Duration) ([]string, error) {
	boxes, err := s.mgr.List()
	if err != nil {
		return nil, err
	}
	var done []string
	for _, bx := range boxes {
		if ctx.Err() != nil {
			return done, ctx.Err()
		}
		// A box working on its own (a build, a job it runs) is in use,
		// though nobody is connected.
		if bx.State == box.StateRunning {
			s.noteCPU(bx.Name)
		}
		// A first look without the box's lock, so that boxes in use (or
		// busy booting) do not hold the loop up.
		if bx.State != box.StateRunning || s.idleFor(bx.Name) < idle {
			continue
		}
		_, ok, err := s.mgr.HibernateIfIdle(ctx, bx.Name, func() bool {
			d := s.idleFor(bx.Name)
			if d < idle {
				return false
			}
			s.log.Info("hibernating idle box", "box", bx.Name, "idle", d.Round(time.Second))
			return true
		})
		if err != nil {
			s.log.Warn("hibernating idle box", "box", bx.Name, "err", err)
			continue
		}
		if ok {
			done = append(done, bx.Name)
		}
	}
	return done, nil
}

// noteCPU samples box name's CPU time and, if it used more than busyCPU
// of one CPU since the last sample, counts the box as used now.
func (s *Server) noteCPU(name string) {
	used, ok := s.mgr.CPUTime(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ok {
		delete(s.cpu, name)
		return
	}
	now := s.now()
	prev, seen := s.cpu[name]
	s.cpu[name] = cpuSample{used: used, at: now}
	if !seen || !now.After(prev.at) || used < prev.used {
		return // a first look, or a machine that started again
	}
	if share := float64(used-prev.used) / float64(now.Sub(prev.at)); share > s.busyCPU {
		s.lastUse[name] = now
	}
}

// IdleLoop calls HibernateIdle every interval until ctx ends. idle <= 0
// returns at once.
func (s *Server) IdleLoop(ctx context.Context, interval, idle time.Duration) {
	if idle <= 0 {
		return
	}
	every(ctx, interval, func() {
		if _, err := s.HibernateIdle(ctx, idle); err != nil && ctx.Err() == nil {
			s.log.Warn("idle hibernation", "err", err)
		}
	})
}
