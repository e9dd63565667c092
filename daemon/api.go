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
	"errors"
	"net/http"
	"path/filepath"
	"time"

	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
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
}

// CreateRequest is the body of POST /v1/boxes.
type CreateRequest struct {
	Name   string   `json:"name"`
	Image  string   `json:"image,omitempty"`
	Memory int64    `json:"memory,omitempty"` // bytes
	CPUs   int      `json:"cpus,omitempty"`
	Keys   []string `json:"keys,omitempty"` // authorized_keys lines
	// Runner is the runner the box asks for: auto (""), qemu or kvm (see
	// box.ChooseRunner).
	Runner string `json:"runner,omitempty"`
	// From is a snapshot a box took to make the new box from (see
	// box.Manager.CreateFrom); it excludes Image, Memory and CPUs, which
	// come from the snapshot.
	From string `json:"from,omitempty"`
}

// ForkRequest is the body of POST /v1/boxes/{name}/fork: the new boxes.
type ForkRequest struct {
	Names []string `json:"names"`
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

// categories are the errdefs categories the API carries, in the order an
// error is tested against them, with their names on the wire and their HTTP
// statuses.
var categories = []struct {
	name   string
	err    error
	status int
}{
	{"invalid_argument", errdefs.ErrInvalidArgument, http.StatusBadRequest},
	{"not_found", errdefs.ErrNotFound, http.StatusNotFound},
	{"already_exists", errdefs.ErrAlreadyExists, http.StatusConflict},
	{"failed_precondition", errdefs.ErrFailedPrecondition, http.StatusConflict},
	{"unavailable", errdefs.ErrUnavailable, http.StatusServiceUnavailable},
	{"data_loss", errdefs.ErrDataLoss, http.StatusInternalServerError},
	{"resource_exhausted", errdefs.ErrResourceExhausted, http.StatusInternalServerError},
	{"not_supported", errdefs.ErrNotImplemented, http.StatusNotImplemented},
}

const categoryUnknown = "unknown"

// Category returns the wire name of err's category and its HTTP status.
func Category(err error) (name string, status int) {
	for _, c := range categories {
		if errors.Is(err, c.err) {
			return c.name, c.status
		}
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
}

func (e *Error) Error() string { return e.Message }

// Unwrap returns the errdefs category, or nil.
func (e *Error) Unwrap() error { return e.cat }

// remoteError rebuilds the error of an answer with status and body b. The
// category named in the body wins; without one (a body that is not the
// API's JSON), the status decides.
func remoteError(status int, b errorBody) *Error {
	e := &Error{Message: b.Error, Category: b.Category, Status: status}
	if e.cat = categoryErr(b.Category); e.cat == nil {
		switch status {
		case http.StatusBadRequest, http.StatusMethodNotAllowed:
			e.Category = "invalid_argument"
		case http.StatusNotFound:
			e.Category = "not_found"
		case http.StatusConflict:
			e.Category = "failed_precondition"
		case http.StatusServiceUnavailable:
			e.Category = "unavailable"
		case http.StatusNotImplemented:
			e.Category = "not_supported"
		default:
			e.Category = categoryUnknown
		}
		e.cat = categoryErr(e.Category)
	}
	if e.Message == "" {
		e.Message = "boxd daemon: " + http.StatusText(status)
	}
	return e
}

// categoryErr returns the errdefs error of the category named name, or nil.
func categoryErr(name string) error {
	for _, c := range categories {
		if c.name == name {
			return c.err
		}
	}
	return nil
}
