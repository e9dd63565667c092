package daemon

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/boxd-dev/boxd/agent"
	"github.com/containerd/errdefs"
)

// The kept processes of a box (see agent.ProcessSpec): a container's
// processes, which outlive the stream that started them.
//
// POST /v1/boxes/{name}/processes, with an agent.ProcessSpec as its body,
// starts one (or attaches to it) on a stream upgraded to ExecProtocol,
// whose frames are those of a streaming exec: from the client stdin, and
// close-stdin, which ends this stream's input but not the process's (POST
// .../close-stdin does), and resize; from the daemon stdout, stderr, then
// exit or error. An error frame whose object says "detached": true means
// the daemon lost the box's agent before the exit status (a hibernated
// box, say): the process runs on, and the client attaches again. A client
// that goes away detaches; the process runs on.
//
// GET /v1/boxes/{name}/processes lists them ([]agent.ProcessInfo); POST
// .../processes/{id}/signal ({"signal": N}), .../resize ({"rows": R,
// "cols": C}) and .../close-stdin act on one; DELETE .../processes/{id}
// kills it if it runs and forgets it.

// ProcessSignalRequest is the body of POST .../processes/{id}/signal.
type ProcessSignalRequest struct {
	Signal int `json:"signal"`
}

// ProcessResizeRequest is the body of POST .../processes/{id}/resize.
type ProcessResizeRequest struct {
	Rows int `json:"rows"`
	Cols int `json:"cols"`
}

// processRoutes adds the kept processes' routes to mux.
func (s *Server) processRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/boxes/{name}/processes", s.processStream)
	mux.HandleFunc("GET /v1/boxes/{name}/processes", s.listProcesses)
	mux.HandleFunc("POST /v1/boxes/{name}/processes/{id}/signal", s.signalProcess)
	mux.HandleFunc("POST /v1/boxes/{name}/processes/{id}/resize", s.resizeProcess)
	mux.HandleFunc("POST /v1/boxes/{name}/processes/{id}/close-stdin", s.closeProcessStdin)
	mux.HandleFunc("DELETE /v1/boxes/{name}/processes/{id}", s.forgetProcess)
}

// processBox returns the box name of r, checked as exec checks it: a
// valid name, a box request r may act on.
func (s *Server) processBox(r *http.Request) (string, error) {
	name, err := boxName(r)
	if err == nil {
		err = s.checkOwned(r, name)
	}
	return name, err
}

// processStream starts or attaches to a kept process on the request's
// connection (see ExecProtocol).
func (s *Server) processStream(w http.ResponseWriter, r *http.Request) {
	if up := r.Header.Get("Upgrade"); !strings.EqualFold(up, ExecProtocol) {
		s.fail(w, r, fmt.Errorf("processes: upgrade to %s for a process's stream (got %q): %w", ExecProtocol, up, errdefs.ErrInvalidArgument))
		return
	}
	name, err := s.processBox(r)
	var spec agent.ProcessSpec
	if err == nil {
		err = decode(w, r, maxRequestBody, &spec)
	}
	if err == nil && spec.ID == "" {
		err = fmt.Errorf("processes: a process needs an ID: %w", errdefs.ErrInvalidArgument)
	}
	if err == nil {
		// An unknown box is refused as an answer, not on the stream.
		_, err = s.mgr.Get(name)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.takeOver(w, r, name, func(conn net.Conn, in *bufio.Reader) { s.runProcessStream(conn, in, name, spec) })
}

// runProcessStream attaches the stream on conn (in reads the client's
// frames) to kept process spec of box name until its exit status, which
// it sends as the last frame, or an error.
func (s *Server) runProcessStream(conn net.Conn, in *bufio.Reader, name string, spec agent.ProcessSpec) {
	// The stream detaches when the daemon stops or the client goes away.
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	out := &frameWriter{w: conn}
	stdin, resize := s.followClient(ctx, cancel, in, name)
	defer stdin.Close()
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case ws := <-resize:
				if err := s.mgr.ResizeProcess(ctx, name, spec.ID, ws.Rows, ws.Cols); err != nil {
					s.log.Debug("process stream: resize", "box", name, "id", spec.ID, "err", err)
				}
			}
		}
	}()

	done := s.begin(name)
	code, err := s.mgr.Process(ctx, name, spec, agent.ProcessIO{
		Stdin: stdin, Stdout: out.stream(frameStdout), Stderr: out.stream(frameStderr),
	})
	done()
	if err != nil {
		if ctx.Err() == nil {
			s.log.Debug("process stream", "box", name, "id", spec.ID, "err", err)
		}
		_ = out.frame(frameError, errorFrame(err))
		return
	}
	_ = out.frame(frameExit, exitFrame(code))
}

// processCall runs fn, an action on kept process {id} of the box of
// request r, as a box use, and answers its error or an empty object.
func (s *Server) processCall(w http.ResponseWriter, r *http.Request, body any, fn func(ctx context.Context, name, id string) error) {
	name, err := s.processBox(r)
	id := r.PathValue("id")
	if err == nil && body != nil {
		err = decode(w, r, maxRequestBody, body)
	}
	if err == nil {
		done := s.begin(name)
		err = fn(r.Context(), name, id)
		done()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, struct{}{})
}

func (s *Server) listProcesses(w http.ResponseWriter, r *http.Request) {
	name, err := s.processBox(r)
	var list []agent.ProcessInfo
	if err == nil {
		done := s.begin(name)
		list, err = s.mgr.Processes(r.Context(), name)
		done()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	if list == nil {
		list = []agent.ProcessInfo{}
	}
	s.reply(w, list)
}

func (s *Server) signalProcess(w http.ResponseWriter, r *http.Request) {
	var req ProcessSignalRequest
	s.processCall(w, r, &req, func(ctx context.Context, name, id string) error {
		return s.mgr.SignalProcess(ctx, name, id, req.Signal)
	})
}

func (s *Server) resizeProcess(w http.ResponseWriter, r *http.Request) {
	var req ProcessResizeRequest
	s.processCall(w, r, &req, func(ctx context.Context, name, id string) error {
		return s.mgr.ResizeProcess(ctx, name, id, req.Rows, req.Cols)
	})
}

func (s *Server) closeProcessStdin(w http.ResponseWriter, r *http.Request) {
	s.processCall(w, r, nil, s.mgr.CloseProcessStdin)
}

func (s *Server) forgetProcess(w http.ResponseWriter, r *http.Request) {
	s.processCall(w, r, nil, s.mgr.ForgetProcess)
}
