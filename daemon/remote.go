package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/remote"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// PushRetry is how often pushes that failed are tried again.
var PushRetry = 10 * time.Second

// receiver is what the remote manager needs of the box manager beyond
// Manager: to wait for snapshots written in the background, and to record
// a box that came from the bucket.
type receiver interface {
	Flush(ctx context.Context) error
	Receive(ctx context.Context, bx box.Box) (box.Box, error)
}

// remoteManager is the box manager of a root that shares a bucket with
// other hosts: a box's hibernation is pushed to the bucket and its lease
// given up, and a resume takes the box's lease first and pulls the box
// when the bucket holds a newer state of it than this root (or this root
// has none).
type remoteManager struct {
	Manager
	rcv receiver
	r   *remote.Remote
	log *slog.Logger

	// limit bounds the local packs the bucket holds too (Evict); 0, none.
	limit int64
	// restoring is held for reading by resumes while they read the store,
	// and for writing by evictions, so no pack goes under a restore.
	restoring sync.RWMutex

	// pushMu serialises pushes, so a retry and a hibernation do not push
	// the same box at once.
	pushMu sync.Mutex
	kick   chan struct{}
}

func newRemoteManager(mgr Manager, rcv receiver, r *remote.Remote, log *slog.Logger) *remoteManager {
	return &remoteManager{Manager: mgr, rcv: rcv, r: r, log: log, kick: make(chan struct{}, 1)}
}

// Hibernate hibernates box name, then pushes it. A push that fails leaves
// the box hibernated here and is tried again (retryLoop).
func (m *remoteManager) Hibernate(ctx context.Context, name string) (box.Box, error) {
	bx, err := m.Manager.Hibernate(ctx, name)
	if err == nil {
		m.pushOrQueue(ctx, name)
	}
	return bx, err
}

// HibernateIfIdle is Manager's, with a push after a hibernation.
func (m *remoteManager) HibernateIfIdle(ctx context.Context, name string, idle func() bool) (box.Box, bool, error) {
	bx, ok, err := m.Manager.HibernateIfIdle(ctx, name, idle)
	if ok && err == nil {
		m.pushOrQueue(ctx, name)
	}
	return bx, ok, err
}

func (m *remoteManager) pushOrQueue(ctx context.Context, name string) {
	if err := m.PushBox(ctx, name); err != nil {
		m.log.Warn("remote: push failed; the box stays hibernated here and the push is tried again", "box", name, "err", err)
		if err := m.r.SetPending(name, true); err != nil {
			m.log.Error("remote: recording a push to try again", "box", name, "err", err)
		}
		select {
		case m.kick <- struct{}{}:
		default:
		}
	}
}

// PushBox pushes hibernated box name: its snapshot chain, then its record,
// then it gives up its lease, so that any host may resume it.
func (m *remoteManager) PushBox(ctx context.Context, name string) error {
	m.pushMu.Lock()
	defer m.pushMu.Unlock()
	bx, err := m.Get(name)
	if err != nil {
		return err
	}
	if bx.State != box.StateHibernated {
		return fmt.Errorf("box %s is %s: only a hibernated box is pushed: %w", name, bx.State, errdefs.ErrFailedPrecondition)
	}
	if err := m.rcv.Flush(ctx); err != nil {
		return err
	}
	// The lease keeps another host from resuming the box while this one
	// writes it, and refuses the push of a box another host owns now.
	if _, err := m.r.TakeLease(ctx, name); err != nil {
		return err
	}
	if _, err := m.r.Push(ctx, bx.Snapshot); err != nil {
		return err
	}
	bx.Disk, bx.Note = "", "" // host paths and this host's notes stay here
	rec, err := json.Marshal(bx)
	if err != nil {
		return err
	}
	if err := m.r.PutBox(ctx, remote.BoxObject{Name: name, Snapshot: bx.Snapshot, Record: rec}); err != nil {
		return err
	}
	if err := m.r.ReleaseLease(ctx, name); err != nil {
		return err
	}
	m.evict(ctx)
	return m.r.SetPending(name, false)
}

// evict bounds the local store to the limit, when there is one.
func (m *remoteManager) evict(ctx context.Context) {
	if m.limit <= 0 {
		return
	}
	m.restoring.Lock()
	defer m.restoring.Unlock()
	if _, err := m.r.Evict(ctx, m.limit); err != nil {
		m.log.Warn("remote: evicting local packs", "err", err)
	}
}

// PullBox brings the bucket's state of box name to this root, when it is
// newer than this root's (another host pushed it, and no push of this
// host's waits), and records it hibernated. It returns whether it
// pulled.
func (m *remoteManager) PullBox(ctx context.Context, name string) (bool, error) {
	obj, err := m.r.GetBox(ctx, name)
	if err != nil {
		return false, err
	}
	if local, err := m.Get(name); err == nil {
		pending, err := m.r.Pending()
		if err != nil {
			return false, err
		}
		// This host's state is as new as the bucket's when it pushed
		// the bucket's, and newer when its own push waits.
		if local.Snapshot == obj.Snapshot || obj.Host == m.r.Host() || slices.Contains(pending, name) {
			return false, nil
		}
	}
	var bx box.Box
	if err := json.Unmarshal(obj.Record, &bx); err != nil || bx.Name != name {
		return false, fmt.Errorf("box object of %s: record unreadable: %w", name, errdefs.ErrDataLoss)
	}
	bx.Snapshot = obj.Snapshot
	if _, err := m.r.Pull(ctx, obj.Snapshot); err != nil {
		return false, err
	}
	if _, err := m.rcv.Receive(ctx, bx); err != nil {
		return false, err
	}
	return true, nil
}

// Resume takes box name's lease (refused while another host owns the
// box), brings the bucket's newer state of it here if there is one, and
// resumes it. A resume that fails gives up the lease it took.
func (m *remoteManager) Resume(ctx context.Context, name string) (bx box.Box, err error) {
	if err := box.ValidateName(name); err != nil {
		return box.Box{}, err
	}
	if !m.resumes(name) {
		// Running, paused or stopped here: this host has it, and the
		// manager says what a resume of it does.
		return m.Manager.Resume(ctx, name)
	}
	taken, err := m.r.TakeLease(ctx, name)
	if err != nil {
		return box.Box{}, fmt.Errorf("resuming box %s: %w", name, err)
	}
	defer func() {
		// A lease held before (a push of the box waits to be tried
		// again) is kept: another host must not resume an older state.
		if err != nil && taken {
			if rerr := m.r.ReleaseLease(context.WithoutCancel(ctx), name); rerr != nil {
				m.log.Error("remote: giving up the lease of a box that did not resume", "box", name, "err", rerr)
			}
		}
	}()
	if _, err := m.PullBox(ctx, name); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return box.Box{}, fmt.Errorf("resuming box %s: %w", name, err)
	}
	if bx, err = m.restore(ctx, name); err != nil {
		return bx, err
	}
	m.evict(ctx)
	return bx, nil
}

// restore resumes box name from the local store, fetching back first what
// an eviction took that it stands on; no eviction runs meanwhile.
func (m *remoteManager) restore(ctx context.Context, name string) (box.Box, error) {
	m.restoring.RLock()
	defer m.restoring.RUnlock()
	if m.limit > 0 {
		if local, err := m.Get(name); err == nil && local.State == box.StateHibernated {
			if _, err := m.r.Fill(ctx, local.Snapshot); err != nil {
				return box.Box{}, fmt.Errorf("resuming box %s: %w", name, err)
			}
		}
	}
	return m.Manager.Resume(ctx, name)
}

// Start resumes box name through Resume when it is hibernated here, or
// only in the bucket; else it is Manager's Start.
func (m *remoteManager) Start(ctx context.Context, name string) (box.Box, error) {
	if m.resumes(name) {
		return m.Resume(ctx, name)
	}
	return m.Manager.Start(ctx, name)
}

// Exec resumes box name through Resume first when it is hibernated here,
// or only in the bucket.
func (m *remoteManager) Exec(ctx context.Context, name string, cmd agent.Command) (int, error) {
	if m.resumes(name) {
		if _, err := m.Resume(ctx, name); err != nil {
			return 0, err
		}
	}
	return m.Manager.Exec(ctx, name, cmd)
}

// resumes reports whether a use of box name resumes it from a snapshot:
// it is hibernated here, or this root has no box of the name.
func (m *remoteManager) resumes(name string) bool {
	bx, err := m.Get(name)
	return errors.Is(err, errdefs.ErrNotFound) || err == nil && bx.State == box.StateHibernated
}

// retryLoop tries the pending pushes again every PushRetry, and at once
// after a push failed, until ctx ends.
func (m *remoteManager) retryLoop(ctx context.Context) {
	m.queueHeld(ctx)
	t := time.NewTicker(PushRetry)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.kick:
			select { // a failed push waits a round before its retry
			case <-ctx.Done():
				return
			case <-time.After(PushRetry):
			}
		}
		pending, err := m.r.Pending()
		if err != nil {
			m.log.Error("remote: reading the pushes to try again", "err", err)
			continue
		}
		for _, name := range pending {
			bx, err := m.Get(name)
			if err != nil || bx.State != box.StateHibernated {
				// Removed, or resumed here: its next hibernation pushes it.
				_ = m.r.SetPending(name, false)
				continue
			}
			if err := m.PushBox(ctx, name); err != nil {
				m.log.Warn("remote: push failed again", "box", name, "err", err)
				continue
			}
			m.log.Info("remote: pushed after a retry", "box", name)
		}
	}
}

// queueHeld queues the push of every box hibernated here whose lease
// this host holds: a daemon killed between a hibernation and its push,
// or stopped (its boxes hibernated on the way out), left them so.
func (m *remoteManager) queueHeld(ctx context.Context) {
	boxes, err := m.List()
	if err != nil {
		return
	}
	for _, bx := range boxes {
		if bx.State != box.StateHibernated {
			continue
		}
		if l, err := m.r.LeaseOf(ctx, bx.Name); err == nil && l.Host == m.r.Host() {
			if err := m.r.SetPending(bx.Name, true); err == nil {
				m.log.Info("remote: a box hibernated here still holds its lease; its push is queued", "box", bx.Name)
			}
		}
	}
}

// hibernateAll hibernates, and so pushes, every box running here: a
// stopping daemon hands its boxes to the other hosts. What fails is left
// to the manager's close, which hibernates it without a push.
func (m *remoteManager) hibernateAll(ctx context.Context) {
	boxes, err := m.List()
	if err != nil {
		return
	}
	for _, bx := range boxes {
		if bx.State != box.StateRunning && bx.State != box.StatePaused {
			continue
		}
		if _, err := m.Hibernate(ctx, bx.Name); err != nil {
			m.log.Warn("remote: hibernating a box on the way out", "box", bx.Name, "err", err)
		}
	}
}

// StorePushRequest names the box (or snapshot) to push or pull, or the
// box whose lease Host holds to break.
type StorePushRequest struct {
	Name string `json:"name"`
	Host string `json:"host,omitempty"`
}

// StorePushResult says what a push or pull did.
type StorePushResult struct {
	Box      string            `json:"box,omitempty"`
	Snapshot string            `json:"snapshot,omitempty"`
	Push     *remote.PushStats `json:"push,omitempty"`
	Pull     *remote.PullStats `json:"pull,omitempty"`
}

// handler serves the remote store's API beside next: POST
// /v1/store/push and /v1/store/pull, GET /v1/store/remote. Requests for a
// registered key's owner are refused: the bucket is the host's.
func (m *remoteManager) handler(next http.Handler, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	s := &Server{log: log}
	mux.HandleFunc("POST /v1/store/{op}", func(w http.ResponseWriter, r *http.Request) {
		var req StorePushRequest
		err := decode(w, r, maxRequestBody, &req)
		if err == nil && r.Header.Get(OwnerHeader) != "" {
			err = fmt.Errorf("the remote store is the host's: %w", errdefs.ErrPermissionDenied)
		}
		var res StorePushResult
		if err == nil {
			switch r.PathValue("op") {
			case "push":
				res, err = m.push(r.Context(), req.Name)
			case "pull":
				res, err = m.pull(r.Context(), req.Name)
			case "break-lease":
				res, err = StorePushResult{Box: req.Name}, m.r.BreakLease(r.Context(), req.Name, req.Host)
			default:
				err = fmt.Errorf("no store operation %q: %w", r.PathValue("op"), errdefs.ErrNotFound)
			}
		}
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.reply(w, res)
	})
	mux.HandleFunc("GET /v1/store/remote", func(w http.ResponseWriter, r *http.Request) {
		rep, err := m.r.Report(r.Context())
		if err != nil {
			s.fail(w, r, err)
			return
		}
		s.reply(w, rep)
	})
	mux.Handle("/", next)
	return mux
}

// push pushes box name when there is one, else snapshot name.
func (m *remoteManager) push(ctx context.Context, name string) (StorePushResult, error) {
	if bx, err := m.Get(name); err == nil {
		return StorePushResult{Box: name, Snapshot: bx.Snapshot}, m.PushBox(ctx, name)
	}
	st, err := m.r.Push(ctx, name)
	return StorePushResult{Snapshot: name, Push: &st}, err
}

// pull pulls box name when the bucket has one, else snapshot name.
func (m *remoteManager) pull(ctx context.Context, name string) (StorePushResult, error) {
	if _, err := m.r.GetBox(ctx, name); err == nil {
		_, err := m.PullBox(ctx, name)
		bx, _ := m.Get(name)
		return StorePushResult{Box: name, Snapshot: bx.Snapshot}, err
	}
	st, err := m.r.Pull(ctx, name)
	return StorePushResult{Snapshot: name, Pull: &st}, err
}

// openRemote links root's graph to the bucket at url (s3://BUCKET/PREFIX)
// and wraps mgr in a remoteManager.
func openRemote(ctx context.Context, url string, cfg Config, g *snapshotter.Graph, mgr *box.Manager, log *slog.Logger) (*remoteManager, func() error, error) {
	b, err := remote.OpenS3(ctx, url)
	if err != nil {
		return nil, nil, err
	}
	r, err := remote.Open(remote.Config{Bucket: b, Graph: g, Root: cfg.Root, DropLabels: backends.HostLabels, Logger: log})
	if err != nil {
		return nil, nil, err
	}
	rm := newRemoteManager(mgr, mgr, r, log)
	rm.limit = cfg.RemoteCacheLimit
	return rm, r.Close, nil
}

// StoreTransfer asks the daemon to push or pull (op) box or snapshot name.
func (c *Client) StoreTransfer(ctx context.Context, op, name string) (StorePushResult, error) {
	var res StorePushResult
	err := c.do(ctx, http.MethodPost, "/v1/store/"+op, StorePushRequest{Name: name}, &res)
	return res, err
}

// BreakLease asks the daemon to break the lease of box name that host
// holds (remote.Remote.BreakLease).
func (c *Client) BreakLease(ctx context.Context, name, host string) error {
	return c.do(ctx, http.MethodPost, "/v1/store/break-lease", StorePushRequest{Name: name, Host: host}, nil)
}

// RemoteReport asks the daemon what its bucket holds.
func (c *Client) RemoteReport(ctx context.Context) (remote.Report, error) {
	var rep remote.Report
	err := c.do(ctx, http.MethodGet, "/v1/store/remote", nil, &rep)
	return rep, err
}

// remoteClients is the front door's view of the boxes of a root that
// shares a bucket: a box the bucket holds and this root lacks is known by
// its pushed record, and an SSH connection to a hibernated box resumes it
// through the remote manager (its lease taken, its newer state pulled).
type remoteClients struct {
	boxClients
	rm *remoteManager
}

// Get returns box name, from the bucket's record when this root has none.
func (c remoteClients) Get(name string) (box.Box, error) {
	bx, err := c.boxClients.Get(name)
	if !errors.Is(err, errdefs.ErrNotFound) {
		return bx, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	obj, rerr := c.rm.r.GetBox(ctx, name)
	if rerr != nil {
		return bx, err
	}
	if json.Unmarshal(obj.Record, &bx) != nil || bx.Name != name {
		return box.Box{}, err
	}
	bx.State, bx.Snapshot = box.StateHibernated, obj.Snapshot
	return bx, nil
}

// Client resumes box name through the remote manager when it is
// hibernated here or only in the bucket, then returns its agent client.
func (c remoteClients) Client(ctx context.Context, name string) (*agent.Client, error) {
	if c.rm.resumes(name) {
		if _, err := c.rm.Resume(ctx, name); err != nil {
			return nil, err
		}
	}
	return c.boxClients.Client(ctx, name)
}

// frontDoorBoxes is mgr for the front door, through rm when the root shares a
// bucket.
func frontDoorBoxes(mgr boxClients, rm *remoteManager) boxClients {
	if rm == nil {
		return mgr
	}
	return remoteClients{boxClients: mgr, rm: rm}
}
