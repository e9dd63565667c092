// Package daemon is boxd's daemon: the HTTP/JSON API on a unix socket under
// boxd's root, the client the commands use, idle hibernation, and the wiring
// of the box manager to the SSH front door.
//
// The API speaks JSON. Every error is an object {"error", "category"} with
// the HTTP status of its category; the client turns it back into an error
// that matches the same errdefs category under errors.Is, so a command's exit
// code is the one it would be had the command done the work itself.
package daemon

import (
	"net/http"
	"path/filepath"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/snapshotter"
)

// SocketName is the API socket's name under boxd's root.
const SocketName = "boxd.sock"

// HostKeyName is the SSH front door's host key under boxd's root.
const HostKeyName = "ssh_host_ed25519_key"

// SocketPath returns the API socket of root.
func SocketPath(root string) string { return filepath.Join(root, SocketName) }

// Info is what GET /v1/info answers: where the daemon serves.
type Info struct {
	Root    string `json:"root"`
	Socket  string `json:"socket"`
	SSHAddr string `json:"ssh_addr"` // host:port of the SSH front door
	// IdleHibernate is how long a box may be idle before it is hibernated
	// (Go duration syntax); "0s" means never.
	IdleHibernate string `json:"idle_hibernate"`
	PID           int    `json:"pid"`
	// MetricsAddr is host:port of the Prometheus metrics (/metrics), when
	// served.
	MetricsAddr string `json:"metrics_addr,omitempty"`
}

// CreateRequest is the body of POST /v1/boxes.
type CreateRequest struct {
	Name   string   `json:"name"`
	Image  string   `json:"image,omitempty"`
	Memory int64    `json:"memory,omitempty"` // bytes
	CPUs   int      `json:"cpus,omitempty"`
	Keys   []string `json:"keys,omitempty"` // authorized_keys lines
	// Runner is the runner the box asks for: auto (""), qemu or kvm; the
	// box manager refuses one that cannot run a box here (see
	// box.ChooseRunner).
	Runner string `json:"runner,omitempty"`
	// From is a snapshot a box took to make the new box from (see
	// box.Manager.CreateFrom); it excludes Image, Memory and CPUs, which
	// come from the snapshot.
	From string `json:"from,omitempty"`
	// NoInside keeps the box command inside the box from forking it (see
	// box.Box.Inside); MaxForks bounds its forks from inside (0: the
	// default, box.DefaultMaxForks).
	NoInside bool `json:"no_inside,omitempty"`
	MaxForks int  `json:"max_forks,omitempty"`
	// HostPorts are TCP ports on the host's loopback the box may reach at
	// its gateway address (box.Box.HostPorts); a registered key's request
	// may not ask for any.
	HostPorts []uint16 `json:"host_ports,omitempty"`
	// Rootfs makes the box's disk from a root file system of the daemon's
	// containerd snapshotter (boxd daemon --containerd-snapshotter): the
	// Source of a mount it handed out. It excludes Image and From.
	Rootfs string `json:"rootfs,omitempty"`
	// Labels are the box's labels (box.Box.Labels).
	Labels map[string]string `json:"labels,omitempty"`
}

// ForkRequest is the body of POST /v1/boxes/{name}/fork: the new boxes.
type ForkRequest struct {
	Names []string `json:"names"`
}

// PromoteRequest is the body of POST /v1/boxes/{name}/promote: the fork of
// box name that becomes name.
type PromoteRequest struct {
	Fork string `json:"fork"`
}

// PromoteResult is what POST /v1/boxes/{name}/promote answers: the box
// name now is, and the snapshot that keeps its state before.
type PromoteResult struct {
	Box  box.Box `json:"box"`
	Kept string  `json:"kept"`
}

// SnapshotRequest is the body of POST /v1/boxes/{name}/snapshot.
type SnapshotRequest struct {
	Name string `json:"name,omitempty"` // the snapshot's name after box.NAME.; chosen when empty
}

// ExecRequest is the body of POST /v1/boxes/{name}/exec, collected (the
// answer is an ExecResult) or streamed (see ExecProtocol).
type ExecRequest struct {
	Args  []string `json:"args"`
	Stdin []byte   `json:"stdin,omitempty"` // base64 in JSON; collected execs only
	// TTY runs the command on a pseudo-terminal of Rows x Cols (24 x 80
	// when zero); its stdout and stderr both arrive as stdout.
	TTY  bool `json:"tty,omitempty"`
	Rows int  `json:"rows,omitempty"`
	Cols int  `json:"cols,omitempty"`
	// Env adds to (or replaces in) the command's environment.
	Env map[string]string `json:"env,omitempty"`
}

// ExecResult is what POST /v1/boxes/{name}/exec answers once the command
// has exited.
type ExecResult struct {
	ExitCode int    `json:"exit_code"`
	Stdout   []byte `json:"stdout"` // base64 in JSON
	Stderr   []byte `json:"stderr"`
	// Truncated says that the command wrote more than MaxExecOutput on
	// stdout or stderr and the rest was dropped.
	Truncated bool `json:"truncated,omitempty"`
}

// SnapshotNode is one snapshot of a box in GET /v1/boxes/{name}/snapshots,
// with the snapshots made from it.
type SnapshotNode struct {
	Name    string            `json:"name"`
	Parent  string            `json:"parent,omitempty"` // may be outside the box: its image, or the box it was forked from
	Created time.Time         `json:"created"`
	Labels  map[string]string `json:"labels,omitempty"`
	Size    int64             `json:"size"` // logical bytes of all its maps
	// Current marks the snapshot the box would resume from.
	Current  bool            `json:"current,omitempty"`
	Children []*SnapshotNode `json:"children,omitempty"`
}

// BoxSnapshots is one box's snapshot tree, in GET /v1/snapshots.
type BoxSnapshots struct {
	Box       string          `json:"box"`
	Snapshots []*SnapshotNode `json:"snapshots"`
}

// BoxReport is the dedup report of one box's snapshots.
type BoxReport struct {
	Box       string             `json:"box"`
	Snapshots []string           `json:"snapshots"`
	Report    snapshotter.Report `json:"report"`
}

// Report is what GET /v1/report answers: a report per box, and one of all
// their snapshots together.
type Report struct {
	Boxes []BoxReport        `json:"boxes"`
	Total snapshotter.Report `json:"total"`
}

// errorBody is the JSON of every error the API answers.
type errorBody struct {
	Error    string `json:"error"`
	Category string `json:"category"`
}

const categoryUnknown = "unknown"

// Category returns the wire name of err's category and its HTTP status,
// from errcat's table; "unknown" and 500 for an error of no category.
func Category(err error) (name string, status int) {
	if r, ok := errcat.Of(err); ok {
		return r.Wire, r.HTTP
	}
	return categoryUnknown, http.StatusInternalServerError
}

// Error is an error the daemon answered. Its message is the daemon's; it
// matches the errdefs category the daemon named under errors.Is.
type Error struct {
	Message  string
	Category string // the wire name; "unknown" when none
	Status   int    // the HTTP status
	cat      error
	// detached says the error ended a kept process's stream before its
	// exit status, the process running on: it matches agent.ErrDetached.
	detached bool
}

func (e *Error) Error() string { return e.Message }

// Is matches agent.ErrDetached when the daemon said the process runs on.
func (e *Error) Is(target error) bool { return e.detached && target == agent.ErrDetached }

// Unwrap returns the errdefs category, or nil.
func (e *Error) Unwrap() error { return e.cat }

// remoteError rebuilds the error of an answer with status and body b. The
// category named in the body wins; without one (a body that is not the
// API's JSON), the status decides, as errcat.FromHTTP reads it.
func remoteError(status int, b errorBody) *Error {
	msg := b.Error
	if msg == "" {
		msg = "boxd daemon: " + http.StatusText(status)
	}
	e := &Error{Message: msg, Category: categoryUnknown, Status: status}
	r, ok := errcat.Named(b.Category)
	if !ok {
		st := status
		if st == http.StatusMethodNotAllowed {
			// A route the daemon serves with other methods: the request
			// was wrong.
			st = http.StatusBadRequest
		}
		r, ok = errcat.Of(errcat.FromHTTP(st, msg))
	}
	if ok {
		e.Category, e.cat = r.Wire, r.Category
	}
	return e
}
