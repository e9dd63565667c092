package shim

import (
	"context"
	"fmt"
	"sync"

	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Router is the task service a serving shim registers: it hands each
// request to the Service of the container it names. A shim serves one
// container, or a pod: its sandbox and the containers CRI starts in it,
// which containerd sends to the sandbox's shim (see the start action).
type Router struct {
	cfg Config // each container's, but for ID

	mu    sync.Mutex
	tasks map[string]*Service
}

var (
	_ taskapi.TTRPCTaskService = (*Router)(nil)
	_ Pods                     = (*Router)(nil)
)

// NewRouter returns the task service of a shim; cfg.ID is the container
// containerd started it for.
func NewRouter(cfg Config) *Router {
	return &Router{cfg: cfg, tasks: map[string]*Service{}}
}

// service returns container id's Service.
func (rt *Router) service(id string) (*Service, error) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	s := rt.tasks[id]
	if s == nil {
		return nil, fmt.Errorf("task %s: not created in this shim: %w", id, errdefs.ErrNotFound)
	}
	return s, nil
}

// PodBox returns the box of the pod whose sandbox container is id.
func (rt *Router) PodBox(id string) (string, error) {
	s, err := rt.service(id)
	if err != nil {
		return "", fmt.Errorf("sandbox %s: %w", id, err)
	}
	if bx := s.Box(); bx != "" {
		return bx, nil
	}
	return "", fmt.Errorf("sandbox %s has no box yet: %w", id, errdefs.ErrFailedPrecondition)
}

// Close ends the streams of every container's processes.
func (rt *Router) Close() {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	for _, s := range rt.tasks {
		s.Close()
	}
}

// Create makes a container's Service and hands it the request.
func (rt *Router) Create(ctx context.Context, r *taskapi.CreateTaskRequest) (*taskapi.CreateTaskResponse, error) {
	rt.mu.Lock()
	s, ok := rt.tasks[r.ID]
	if !ok {
		cfg := rt.cfg
		cfg.ID, cfg.Exit, cfg.Pods = r.ID, nil, rt
		s = New(cfg)
		rt.tasks[r.ID] = s
	}
	rt.mu.Unlock()
	resp, err := s.Create(ctx, r)
	if err != nil && !ok {
		rt.mu.Lock()
		delete(rt.tasks, r.ID)
		rt.mu.Unlock()
		s.Close()
	}
	return resp, err
}

// Delete hands the request on; a container whose task is deleted leaves
// the shim.
func (rt *Router) Delete(ctx context.Context, r *taskapi.DeleteRequest) (*taskapi.DeleteResponse, error) {
	s, err := rt.service(r.ID)
	if err != nil {
		return nil, err
	}
	resp, err := s.Delete(ctx, r)
	if err == nil && r.ExecID == "" {
		rt.mu.Lock()
		delete(rt.tasks, r.ID)
		rt.mu.Unlock()
		s.Close()
	}
	return resp, err
}

// Shutdown lets the shim go once no container's task is left (or at once
// with Now).
func (rt *Router) Shutdown(ctx context.Context, r *taskapi.ShutdownRequest) (*emptypb.Empty, error) {
	rt.mu.Lock()
	busy := false
	for _, s := range rt.tasks {
		busy = busy || s.busy()
	}
	rt.mu.Unlock()
	if busy && !r.Now {
		return &emptypb.Empty{}, nil
	}
	rt.Close()
	if rt.cfg.Exit != nil {
		rt.cfg.Exit()
	}
	return &emptypb.Empty{}, nil
}

// route calls fn with the Service of container id.
func route[R, T any](rt *Router, ctx context.Context, id string, r R, fn func(*Service, context.Context, R) (T, error)) (T, error) {
	s, err := rt.service(id)
	if err != nil {
		var zero T
		return zero, err
	}
	return fn(s, ctx, r)
}

// State hands the request to the container's Service.
func (rt *Router) State(ctx context.Context, r *taskapi.StateRequest) (*taskapi.StateResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).State)
}

// Start hands the request to the container's Service.
func (rt *Router) Start(ctx context.Context, r *taskapi.StartRequest) (*taskapi.StartResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).Start)
}

// Pids hands the request to the container's Service.
func (rt *Router) Pids(ctx context.Context, r *taskapi.PidsRequest) (*taskapi.PidsResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).Pids)
}

// Pause hands the request to the container's Service.
func (rt *Router) Pause(ctx context.Context, r *taskapi.PauseRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Pause)
}

// Resume hands the request to the container's Service.
func (rt *Router) Resume(ctx context.Context, r *taskapi.ResumeRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Resume)
}

// Checkpoint hands the request to the container's Service.
func (rt *Router) Checkpoint(ctx context.Context, r *taskapi.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Checkpoint)
}

// Kill hands the request to the container's Service.
func (rt *Router) Kill(ctx context.Context, r *taskapi.KillRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Kill)
}

// Exec hands the request to the container's Service.
func (rt *Router) Exec(ctx context.Context, r *taskapi.ExecProcessRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Exec)
}

// ResizePty hands the request to the container's Service.
func (rt *Router) ResizePty(ctx context.Context, r *taskapi.ResizePtyRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).ResizePty)
}

// CloseIO hands the request to the container's Service.
func (rt *Router) CloseIO(ctx context.Context, r *taskapi.CloseIORequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).CloseIO)
}

// Update hands the request to the container's Service.
func (rt *Router) Update(ctx context.Context, r *taskapi.UpdateTaskRequest) (*emptypb.Empty, error) {
	return route(rt, ctx, r.ID, r, (*Service).Update)
}

// Wait hands the request to the container's Service.
func (rt *Router) Wait(ctx context.Context, r *taskapi.WaitRequest) (*taskapi.WaitResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).Wait)
}

// Stats hands the request to the container's Service.
func (rt *Router) Stats(ctx context.Context, r *taskapi.StatsRequest) (*taskapi.StatsResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).Stats)
}

// Connect hands the request to the container's Service.
func (rt *Router) Connect(ctx context.Context, r *taskapi.ConnectRequest) (*taskapi.ConnectResponse, error) {
	return route(rt, ctx, r.ID, r, (*Service).Connect)
}
