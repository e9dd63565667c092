package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/events"
	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/boxd-dev/boxd/sshproxy"
	"golang.org/x/crypto/ssh"
)

// Defaults of the daemon.
const (
	DefaultSSHListen     = "127.0.0.1:2222"
	DefaultIdleHibernate = 5 * time.Minute
	// IdleInterval is how often idle boxes are looked for.
	IdleInterval = 30 * time.Second
)

// Shutdown bounds: how long requests in flight may finish, and how long
// hibernating the running boxes may take.
const (
	requestGrace = 30 * time.Second
	closeTimeout = 10 * time.Minute
)

// Config configures Run.
type Config struct {
	Root          string
	SSHListen     string        // host:port of the SSH front door
	IdleHibernate time.Duration // 0 disables idle hibernation
	Kernel        string        // a kernel to boot instead of Debian's cloud kernel
	// CompactAfter is how long the API must be quiet before the store's
	// fresh packs are compacted (see Server.CompactLoop); 0 never.
	CompactAfter time.Duration
	// Spares is how many spare machines wait for a fork of each box (see
	// box.Config.Spares): 0 means box.DefaultSpares, negative none.
	Spares int
	// ForkMovesParent makes a fork's parent freeze its memory as the
	// fork's and go on in a new machine on it (box.Config.ForkMovesParent).
	ForkMovesParent bool
	// EagerRestore makes a resume rebuild a box's whole memory before it
	// runs, instead of serving its pages while it runs
	// (backends.Config.EagerRestore).
	EagerRestore bool
	// LiveForks makes a fork copy a box's memory live, with QEMU's dirty
	// tracking (backends.Config.LiveForks).
	LiveForks bool
	// LazyGrace is how long a lazily resumed box's memory beyond its
	// working set waits before it is pushed (backends.Config.LazyGrace).
	LazyGrace time.Duration
	// DiskLayers bounds a box's disk chain (backends.Config.DiskLayers).
	DiskLayers int
	// MetricsListen, when set, is the host:port Prometheus metrics are
	// served on (/metrics); it must be loopback unless MetricsAllowRemote.
	MetricsListen      string
	MetricsAllowRemote bool
	Logger             *slog.Logger
	// LeaveRunning makes the daemon leave running boxes running when it
	// stops, for the next daemon on the root to adopt (an upgrade),
	// instead of hibernating them.
	LeaveRunning bool
	// Ready, when not nil, is called once the daemon serves.
	Ready func(Info)
	// ContainerdSnapshotter, when set, is a unix socket the daemon serves
	// containerd's snapshots API on, over its own store (a proxy
	// snapshotter, as boxd snapshotter serves), so that containerd's
	// containers can run in boxes (CreateRequest.Rootfs).
	ContainerdSnapshotter string
	// Remote, when set, is the bucket (s3://BUCKET/PREFIX) this root
	// shares with other hosts: hibernated boxes are pushed there, and a
	// box another host pushed resumes here (see package remote).
	Remote string
	// RemoteCacheLimit, when positive, bounds the local store's packs that
	// the bucket holds too: the least recently read go first (see
	// remote.Remote.Evict).
	RemoteCacheLimit int64
}

// vmmCommand starts the kvm runner's VMM: this binary's hidden vmm command.
func vmmCommand() []string {
	exe := boxdBinary()
	if exe == "" {
		return nil
	}
	return []string{exe, "vmm"}
}

// boxdBinary is this binary, which runs the kvm runner's VMM and the
// commands of the front door's user boxd; "" when it cannot be found.
func boxdBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return ""
	}
	return exe
}

// Run serves root's boxes until ctx ends: the API on ROOT/boxd.sock and the
// SSH front door on cfg.SSHListen. Then it stops accepting, lets requests in
// flight finish, hibernates every running box and returns nil. Another
// daemon (or another boxd command holding the store) on the same root makes
// it fail at once.
func Run(ctx context.Context, cfg Config) (err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.MetricsListen != "" {
		if err := CheckMetricsAddr(cfg.MetricsListen, cfg.MetricsAllowRemote); err != nil {
			return err
		}
	}
	g, err := snapshotter.Open(cfg.Root)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := g.Close(); err == nil {
			err = cerr
		}
	}()
	if err := procstat.SetOOMScoreAdj(os.Getpid(), backends.DaemonOOMScoreAdj); err != nil {
		log.Warn("the kernel's OOM killer may pick the daemon before a box", "err", err)
	}
	bk := backends.New(backends.Config{Root: cfg.Root, Graph: g, Logger: log, VMM: vmmCommand(), Detached: true, LazyGrace: cfg.LazyGrace, DiskLayers: cfg.DiskLayers,
		// A bounded cache of the bucket's packs may evict a pack a lazy
		// restore has yet to read: restores read all memory first there.
		EagerRestore: cfg.EagerRestore || cfg.RemoteCacheLimit > 0,
		LiveForks:    cfg.LiveForks,
	})
	exchange := events.New(0)
	mgr, err := box.Open(box.Config{
		Root: cfg.Root, Graph: g, Kernel: cfg.Kernel, Logger: log,
		Runners: bk.Runners, DefaultRunner: backends.Default, Spares: cfg.Spares,
		Events: exchange, ForkMovesParent: cfg.ForkMovesParent,
	})
	if err != nil {
		return err
	}
	// The boxes a previous daemon left running are adopted: what else it
	// left goes.
	bk.Reclaim()
	if left, _ := filepath.Glob(filepath.Join(cfg.Root, rootfsTemp+"*")); len(left) > 0 {
		for _, dir := range left {
			_ = os.RemoveAll(dir)
		}
	}
	closeMgr := func() error {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), closeTimeout)
		defer cancel()
		if cfg.LeaveRunning {
			return errors.Join(mgr.LeaveRunning(cctx), bk.Close(cctx))
		}
		return errors.Join(mgr.Close(cctx), bk.Close(cctx))
	}
	hostKey, err := sshproxy.LoadOrCreateHostKey(filepath.Join(cfg.Root, HostKeyName))
	if err != nil {
		return errors.Join(err, closeMgr())
	}
	keys, err := OpenKeyRegistry(filepath.Join(cfg.Root, KeysName))
	if err != nil {
		return errors.Join(err, closeMgr())
	}
	sshL, err := net.Listen("tcp", cfg.SSHListen)
	if err != nil {
		return errors.Join(fmt.Errorf("ssh front door: %w", err), closeMgr())
	}
	apiL, err := listenSocket(SocketPath(cfg.Root))
	if err != nil {
		sshL.Close()
		return errors.Join(err, closeMgr())
	}
	defer os.Remove(SocketPath(cfg.Root))
	var metricsL net.Listener
	if cfg.MetricsListen != "" {
		if metricsL, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			sshL.Close()
			apiL.Close()
			return errors.Join(fmt.Errorf("metrics: %w", err), closeMgr())
		}
	}

	srvCtx, stopOps := context.WithCancel(context.WithoutCancel(ctx))
	defer stopOps()
	info := Info{
		Root: cfg.Root, Socket: SocketPath(cfg.Root), SSHAddr: sshL.Addr().String(),
		IdleHibernate: cfg.IdleHibernate.String(), PID: os.Getpid(),
	}
	if metricsL != nil {
		info.MetricsAddr = metricsL.Addr().String()
	}
	var apiMgr Manager = mgr
	var rm *remoteManager
	if cfg.Remote != "" {
		var closeRemote func() error
		if rm, closeRemote, err = openRemote(ctx, cfg.Remote, cfg, g, mgr, log); err != nil {
			sshL.Close()
			apiL.Close()
			return errors.Join(err, closeMgr())
		}
		defer func() {
			if cerr := closeRemote(); err == nil {
				err = cerr
			}
		}()
		apiMgr = rm
		go rm.retryLoop(srvCtx)
	}
	opts := Options{Manager: apiMgr, Graph: g, Info: info, Logger: log, Events: exchange, Keys: keys, Images: GraphImages{Graph: g}}
	if cfg.ContainerdSnapshotter != "" {
		sn, err := serveSnapshotter(cfg.ContainerdSnapshotter, cfg.Root, g, log)
		if err != nil {
			sshL.Close()
			apiL.Close()
			return errors.Join(err, closeMgr())
		}
		defer sn.stop()
		opts.Rootfs = sn
	}
	api := NewServer(srvCtx, opts)
	proxy := &sshproxy.Server{
		HostKey: hostKey, Backend: &backend{mgr: frontDoorBoxes(mgr, rm), srv: api}, Logger: log,
		Commands: &commandRunner{root: cfg.Root, exe: boxdBinary(), keys: keys},
	}
	var ms *http.Server
	if metricsL != nil {
		metrics := NewMetrics(mgr, g, exchange, log)
		proxy.Observe = metrics.SSH
		ms = &http.Server{Handler: metrics.Handler(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	}
	handler := api.Handler()
	if rm != nil {
		handler = rm.handler(handler, log)
	}
	hs := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	hs.RegisterOnShutdown(api.EndStreams)

	served := make(chan error, 2)
	go func() { served <- fmt.Errorf("ssh front door: %w", proxy.Serve(sshL)) }()
	go func() { served <- fmt.Errorf("api: %w", hs.Serve(apiL)) }()
	if ms != nil {
		go func() {
			if err := ms.Serve(metricsL); !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics: serving stopped", "err", err)
			}
		}()
		defer ms.Close()
	}
	idleDone := make(chan struct{})
	go func() {
		defer close(idleDone)
		api.IdleLoop(srvCtx, IdleInterval, cfg.IdleHibernate)
	}()
	compactDone := make(chan struct{})
	go func() {
		defer close(compactDone)
		api.CompactLoop(srvCtx, cfg.CompactAfter)
	}()
	log.Info("boxd daemon serving", "root", cfg.Root, "api", info.Socket, "ssh", info.SSHAddr, "idle_hibernate", info.IdleHibernate, "metrics", info.MetricsAddr)
	if cfg.Ready != nil {
		cfg.Ready(info)
	}

	var failed error
	select {
	case <-ctx.Done():
	case failed = <-served:
	}
	if cfg.LeaveRunning {
		log.Info("boxd daemon stopping: leaving running boxes running for the next daemon")
	} else {
		log.Info("boxd daemon stopping: hibernating running boxes")
	}
	// Stop accepting: SSH connections end now (their boxes are about to
	// hibernate, or to be adopted); API requests in flight may finish for
	// a while, then the operations they started are cancelled.
	_ = proxy.Close()
	sctx, cancel := context.WithTimeout(context.Background(), requestGrace)
	if err := hs.Shutdown(sctx); err != nil {
		stopOps()
		_ = hs.Close()
	}
	// Streaming execs, which Shutdown does not see, get what is left of
	// the grace too.
	_ = api.WaitStreams(sctx)
	cancel()
	stopOps()
	api.WaitBuilds()
	<-idleDone
	<-compactDone
	if rm != nil && !cfg.LeaveRunning {
		hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), closeTimeout)
		rm.hibernateAll(hctx)
		cancel()
	}
	return errors.Join(failed, closeMgr())
}

// listenSocket listens on the unix socket path, mode 0600. A socket left
// there is stale: the caller holds the root's store, so no other daemon
// serves on it. The socket is made under a temporary name and renamed into
// place once its mode is set, so nobody else ever connects to it.
func listenSocket(path string) (net.Listener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket; move it away", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	_ = os.Remove(tmp)
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("api socket: %w", err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("api socket: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("api socket: %w", err)
	}
	return l, nil
}

// boxClients is what the SSH front door's backend needs of the manager.
type boxClients interface {
	Get(name string) (box.Box, error)
	Client(ctx context.Context, name string) (*agent.Client, error)
}

// backend connects the SSH front door to the boxes, and tells the server
// which boxes have SSH connections, so that they are not hibernated.
type backend struct {
	mgr boxClients
	srv *Server
}

// AuthorizedKeys returns the keys recorded with box name.
func (b *backend) AuthorizedKeys(_ context.Context, name string) ([]ssh.PublicKey, error) {
	bx, err := b.mgr.Get(name)
	if err != nil {
		return nil, err
	}
	return sshproxy.ParseAuthorizedKeys([]byte(strings.Join(bx.Keys, "\n")))
}

// Connect returns the client of box name's agent, resuming or booting the
// box first. The box counts as in use until ctx ends: the person's SSH
// connection closes.
func (b *backend) Connect(ctx context.Context, name string) (*ssh.Client, error) {
	done := b.srv.begin(name)
	context.AfterFunc(ctx, done)
	c, err := b.mgr.Client(ctx, name)
	if err != nil {
		return nil, err
	}
	return c.SSH(), nil
}
