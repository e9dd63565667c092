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
	"net"
	"net/http"
	"net/url"
	"syscall"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Client talks to the daemon of one root over its API socket. Its methods
// wait as long as the operation takes (a boot, a hibernate); their context
// bounds the wait, but an operation the daemon started goes on without it.
type Client struct {
	root   string
	socket string
	hc     *http.Client
	owner  string // sent as OwnerHeader when not ""
}

// NewClient returns a client of the daemon serving root. It connects on
// each call, so it may be made before the daemon runs.
func NewClient(root string) *Client {
	socket := SocketPath(root)
	return &Client{
		root:   root,
		socket: socket,
		hc: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", socket)
			},
			MaxIdleConns: 4,
		}},
	}
}

// ForOwner returns a client whose requests act for the registered key of
// fingerprint fp (OwnerHeader): they see and act on that key's boxes alone.
func (c *Client) ForOwner(fp string) *Client {
	cc := *c
	cc.owner = fp
	return &cc
}

// newRequest is every request of the client: to the daemon, with
// OwnerHeader when the client acts for a registered key.
func (c *Client) newRequest(ctx context.Context, method, path string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://boxd"+path, body)
	if err != nil {
		return nil, err
	}
	if c.owner != "" {
		req.Header.Set(OwnerHeader, c.owner)
	}
	return req, nil
}

// NotRunningError is the error of a call when no daemon serves the root.
type NotRunningError struct {
	Root string
	Err  error // what connecting to the socket said
}

func (e *NotRunningError) Error() string {
	return fmt.Sprintf("boxd daemon is not running on %s (start it with: boxd daemon --root %s)", e.Root, e.Root)
}

// Is makes a NotRunningError match errdefs.ErrUnavailable. It does not
// unwrap to Err: a missing socket is no missing file of the caller's.
func (e *NotRunningError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// open sends a request with body in as JSON (none when nil) and returns
// the answer, for the caller to read and close, when it is 200 OK; any
// other answer is the error its body names.
func (c *Client) open(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := c.newRequest(ctx, method, path, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, c.connError(ctx, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var eb errorBody
		_ = json.NewDecoder(io.LimitReader(resp.Body, maxRequestBody)).Decode(&eb)
		return nil, remoteError(resp.StatusCode, eb)
	}
	return resp, nil
}

// do sends a request with body in as JSON (none when nil) and decodes the
// answer into out (discarded when nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.open(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("boxd daemon at %s: reading the answer: %w", c.socket, err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("boxd daemon at %s: decoding the answer: %w", c.socket, err)
	}
	return nil
}

// connError is the error of a failure to reach the daemon, or to hear
// from it, under ctx.
func (c *Client) connError(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return &NotRunningError{Root: c.root, Err: err}
	}
	if errors.Is(err, syscall.EACCES) {
		return fmt.Errorf("cannot reach the boxd daemon at %s: permission denied (its socket is root's alone)", c.socket)
	}
	return fmt.Errorf("boxd daemon at %s: %w", c.socket, err)
}

func boxPath(name string, rest ...string) string {
	p := "/v1/boxes/" + url.PathEscape(name)
	for _, r := range rest {
		p += "/" + r
	}
	return p
}

// Info returns where the daemon serves.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var i Info
	return i, c.do(ctx, http.MethodGet, "/v1/info", nil, &i)
}

// List returns every box.
func (c *Client) List(ctx context.Context) ([]box.Box, error) {
	var out []box.Box
	return out, c.do(ctx, http.MethodGet, "/v1/boxes", nil, &out)
}

// Get returns box name.
func (c *Client) Get(ctx context.Context, name string) (box.Box, error) {
	var out box.Box
	return out, c.do(ctx, http.MethodGet, boxPath(name), nil, &out)
}

// Create makes a box and returns once it runs.
func (c *Client) Create(ctx context.Context, req CreateRequest) (box.Box, error) {
	var out box.Box
	return out, c.do(ctx, http.MethodPost, "/v1/boxes", req, &out)
}

// Fork makes boxes names from box src.
func (c *Client) Fork(ctx context.Context, src string, names []string) ([]box.Box, error) {
	var out []box.Box
	return out, c.do(ctx, http.MethodPost, boxPath(src, "fork"), ForkRequest{Names: names}, &out)
}

// Promote makes fork, a fork of box name, the new name; the answer names
// the snapshot that keeps name's state before.
func (c *Client) Promote(ctx context.Context, name, fork string) (PromoteResult, error) {
	var out PromoteResult
	return out, c.do(ctx, http.MethodPost, boxPath(name, "promote"), PromoteRequest{Fork: fork}, &out)
}

func (c *Client) lifecycle(ctx context.Context, name, action string) (box.Box, error) {
	var out box.Box
	return out, c.do(ctx, http.MethodPost, boxPath(name, action), struct{}{}, &out)
}

// Start boots a stopped box (or resumes a hibernated one).
func (c *Client) Start(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "start")
}

// Stop shuts a box's machine down.
func (c *Client) Stop(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "stop")
}

// Pause stops a running box's vCPUs; its memory stays where it is.
func (c *Client) Pause(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "pause")
}

// Unpause lets a paused box run on.
func (c *Client) Unpause(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "unpause")
}

// Hibernate snapshots a running box and stops its machine.
func (c *Client) Hibernate(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "hibernate")
}

// Resume brings a hibernated box back.
func (c *Client) Resume(ctx context.Context, name string) (box.Box, error) {
	return c.lifecycle(ctx, name, "resume")
}

// Snapshot saves running box name as snapshot box.NAME.SNAP (SNAP chosen
// by the daemon when empty).
func (c *Client) Snapshot(ctx context.Context, name, snap string) (snapshotter.Snapshot, error) {
	var out snapshotter.Snapshot
	return out, c.do(ctx, http.MethodPost, boxPath(name, "snapshot"), SnapshotRequest{Name: snap}, &out)
}

// Snapshots returns box name's snapshots as a tree.
func (c *Client) Snapshots(ctx context.Context, name string) ([]*SnapshotNode, error) {
	var out []*SnapshotNode
	return out, c.do(ctx, http.MethodGet, boxPath(name, "snapshots"), nil, &out)
}

// AllSnapshots returns every box's snapshot tree.
func (c *Client) AllSnapshots(ctx context.Context) ([]BoxSnapshots, error) {
	var out []BoxSnapshots
	return out, c.do(ctx, http.MethodGet, "/v1/snapshots", nil, &out)
}

// Exec runs args in box name with stdin and returns once it has exited,
// with its output collected. ExecStream streams instead.
func (c *Client) Exec(ctx context.Context, name string, args []string, stdin []byte) (ExecResult, error) {
	var out ExecResult
	return out, c.do(ctx, http.MethodPost, boxPath(name, "exec"), ExecRequest{Args: args, Stdin: stdin}, &out)
}

// ExecOptions are a streaming exec's command, terminal and streams.
type ExecOptions struct {
	Args []string
	// Stdin is read to its end and passed on as the command's input; nil
	// means empty input.
	Stdin io.Reader
	// Stdout and Stderr get the command's output as it is written; nil
	// discards it.
	Stdout, Stderr io.Writer
	// TTY runs the command on a pseudo-terminal of Rows x Cols (24 x 80
	// when zero); its stdout and stderr both arrive on Stdout.
	TTY        bool
	Rows, Cols int
	// Resize, when not nil, carries window size changes to the pty.
	Resize <-chan agent.WindowSize
	// Env adds to (or replaces in) the command's environment.
	Env map[string]string
}

// ExecStream runs opts.Args in box name, streaming its input and output
// (see ExecProtocol), and returns its exit status once it has exited (as
// agent.Client.Run reports it). err is for failures to run it at all: an
// unknown box, a box that did not come up, a lost connection, or ctx
// ending, which ends the command. It does not wait for a read of
// opts.Stdin in progress when the command exits.
func (c *Client) ExecStream(ctx context.Context, name string, opts ExecOptions) (int, error) {
	body, err := json.Marshal(ExecRequest{Args: opts.Args, TTY: opts.TTY, Rows: opts.Rows, Cols: opts.Cols, Env: opts.Env})
	if err != nil {
		return -1, err
	}
	return c.stream(ctx, boxPath(name, "exec"), body, opts)
}

// stream sends body to path, asking to upgrade to ExecProtocol, and runs
// the stream with opts's streams until its last frame.
func (c *Client) stream(ctx context.Context, path string, body []byte, opts ExecOptions) (int, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", c.socket)
	if err != nil {
		return -1, c.connError(ctx, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	fail := func(err error) (int, error) {
		if ctx.Err() != nil {
			return -1, ctx.Err()
		}
		return -1, err
	}

	in, err := c.upgradeExec(ctx, conn, path, body)
	if err != nil {
		return fail(err)
	}
	out := &frameWriter{w: conn}
	done := make(chan struct{})
	defer close(done)
	// A failure to send is not the end: the daemon may have sent its last
	// frame (a refusal) and closed the connection first, and that frame
	// is what the caller wants to know.
	_ = sendClientFrames(out, opts, done)
	code, err := c.receiveOutput(in, opts)
	if err != nil {
		return fail(err)
	}
	return code, nil
}

// upgradeExec sends the request body to path on conn, asking to upgrade
// to ExecProtocol, and returns the reader of the daemon's frames once it
// agreed; a refusal is the API's error.
func (c *Client) upgradeExec(ctx context.Context, conn net.Conn, path string, body []byte) (*bufio.Reader, error) {
	req, err := c.newRequest(ctx, http.MethodPost, path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", ExecProtocol)
	if err := req.Write(conn); err != nil {
		return nil, c.connError(ctx, err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, fmt.Errorf("boxd daemon at %s: reading the answer: %w", c.socket, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, maxRequestBody))
		resp.Body.Close()
		var eb errorBody
		_ = json.Unmarshal(data, &eb)
		return nil, remoteError(resp.StatusCode, eb)
	}
	return br, nil
}

// sendClientFrames starts sending the command's input and window sizes of
// opts on out, in the background until done is closed; no input at all is
// one close-stdin frame, sent at once.
func sendClientFrames(out *frameWriter, opts ExecOptions, done <-chan struct{}) error {
	if opts.Stdin == nil {
		if err := out.frame(frameCloseStdin, nil); err != nil {
			return err
		}
	} else {
		go sendInput(opts.Stdin, out)
	}
	if opts.Resize != nil {
		go sendResizes(opts.Resize, out, done)
	}
	return nil
}

// sendResizes sends the window sizes from resize on an exec stream until
// done is closed, resize is, or the stream breaks.
func sendResizes(resize <-chan agent.WindowSize, out *frameWriter, done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		case ws, ok := <-resize:
			if !ok {
				return
			}
			if out.frame(frameResize, resizeFrame(ws)) != nil {
				return
			}
		}
	}
}

// receiveOutput passes the daemon's frames from in on to opts.Stdout and
// opts.Stderr until the last frame, and returns the command's exit status
// or the error that frame carries.
func (c *Client) receiveOutput(in io.Reader, opts ExecOptions) (int, error) {
	var buf []byte
	for {
		kind, p, err := readFrame(in, &buf)
		if err != nil {
			return -1, c.streamLost(err)
		}
		var w io.Writer
		switch kind {
		case frameStdout:
			w = opts.Stdout
		case frameStderr:
			w = opts.Stderr
		case frameExit:
			if len(p) != 4 {
				return -1, fmt.Errorf("boxd daemon at %s: an exit frame of %d bytes", c.socket, len(p))
			}
			return int(int32(binary.BigEndian.Uint32(p))), nil
		case frameError:
			return -1, streamError(p)
		default:
			return -1, fmt.Errorf("boxd daemon at %s: unknown frame kind %d on the exec stream", c.socket, kind)
		}
		if w != nil {
			if _, err := w.Write(p); err != nil {
				return -1, fmt.Errorf("writing the command's output: %w", err)
			}
		}
	}
}

// sendInput sends in on an exec stream, then its end.
func sendInput(in io.Reader, out *frameWriter) {
	buf := make([]byte, MaxFrame)
	for {
		n, err := in.Read(buf)
		if n > 0 {
			if out.frame(frameStdin, buf[:n]) != nil {
				return
			}
		}
		if err != nil {
			_ = out.frame(frameCloseStdin, nil)
			return
		}
	}
}

// streamLost is the error of an exec stream that broke before the
// command's exit status came.
func (c *Client) streamLost(err error) error {
	return fmt.Errorf("boxd daemon at %s: the exec stream ended before the command's exit status (%w): %w: %w", c.socket, err, errStreamLost, errdefs.ErrUnavailable)
}

// errStreamLost marks the error of a stream that broke.
var errStreamLost = errors.New("stream lost")

// Remove deletes box name.
func (c *Client) Remove(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, boxPath(name), nil, nil)
}

// GC collects the store's garbage through the daemon (threshold 0 means
// the store's default).
func (c *Client) GC(ctx context.Context, threshold float64) (cas.GCStats, error) {
	var out cas.GCStats
	return out, c.do(ctx, http.MethodPost, "/v1/gc", GCRequest{Threshold: threshold}, &out)
}

// Compact recompresses the store's freshly written packs through the
// daemon, with the options of req (zero fields mean the store's defaults).
func (c *Client) Compact(ctx context.Context, req CompactRequest) (cas.CompactStats, error) {
	var out cas.CompactStats
	return out, c.do(ctx, http.MethodPost, "/v1/compact", req, &out)
}

// Report returns the dedup report of the boxes named (all when none).
func (c *Client) Report(ctx context.Context, boxes ...string) (Report, error) {
	q := url.Values{}
	for _, b := range boxes {
		q.Add("box", b)
	}
	path := "/v1/report"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out Report
	return out, c.do(ctx, http.MethodGet, path, nil, &out)
}
