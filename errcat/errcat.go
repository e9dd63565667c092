// Package errcat is boxd's one table of error categories: every error a
// person or a script can act on wraps one of containerd's errdefs sentinels
// (errdefs.ErrNotFound, errdefs.ErrDataLoss, errdefs.ErrNotImplemented, ...),
// so callers decide with errors.Is and translate once, at the edge, to an
// HTTP status in the daemon or an exit code in the CLI.
package errcat

import (
	"errors"
	"fmt"
	"io/fs"
	"net/http"

	"github.com/containerd/errdefs"
)

// Row is one error category and how boxd shows it at its edges.
type Row struct {
	// Category is the errdefs sentinel errors of the category wrap.
	Category error
	// Also are other errors that count as the category, e.g. fs.ErrNotExist
	// as not found.
	Also []error
	// Name is how people call the category: "not found".
	Name string
	// Wire is the category's name in the daemon API's error bodies.
	Wire string
	// HTTP is the status the daemon answers an error of the category with.
	HTTP int
	// FromStatus says FromHTTP reads HTTP back as this category (an answer
	// that names none); at most one row per status has it.
	FromStatus bool
	// Exit is the boxd command's exit code for an error of the category.
	Exit int
	// Meaning is the README's wording for Exit.
	Meaning string
}

// The exit codes outside the table.
const (
	ExitSuccess = 0 // no error
	ExitFailure = 1 // an error of no category in the table
)

// table is in the order an error is tested against the categories, which
// is the order of the exit codes.
var table = []Row{
	{Category: errdefs.ErrInvalidArgument, Name: "invalid argument", Wire: "invalid_argument",
		HTTP: http.StatusBadRequest, FromStatus: true, Exit: 2,
		Meaning: "bad arguments or names"},
	{Category: errdefs.ErrNotFound, Also: []error{fs.ErrNotExist}, Name: "not found", Wire: "not_found",
		HTTP: http.StatusNotFound, FromStatus: true, Exit: 3,
		Meaning: "not found: an unknown snapshot or parent, a missing file"},
	{Category: errdefs.ErrAlreadyExists, Name: "already exists", Wire: "already_exists",
		HTTP: http.StatusConflict, Exit: 4,
		Meaning: "the name is taken"},
	{Category: errdefs.ErrFailedPrecondition, Name: "failed precondition", Wire: "failed_precondition",
		HTTP: http.StatusConflict, FromStatus: true, Exit: 5,
		Meaning: "refused: e.g. removing a snapshot that has children"},
	{Category: errdefs.ErrDataLoss, Name: "data loss", Wire: "data_loss",
		HTTP: http.StatusInternalServerError, Exit: 6,
		Meaning: "damaged data: `verify` found damage, or a read failed its hash"},
	{Category: errdefs.ErrResourceExhausted, Name: "resource exhausted", Wire: "resource_exhausted",
		HTTP: http.StatusInternalServerError, Exit: 7,
		Meaning: "out of room: the disk is full, or the host lacks the memory an operation needs"},
	{Category: errdefs.ErrUnavailable, Name: "unavailable", Wire: "unavailable",
		HTTP: http.StatusServiceUnavailable, FromStatus: true, Exit: 8,
		Meaning: "unavailable: the root is in use by another boxd process, the daemon is not running, or a box did not come up"},
	{Category: errdefs.ErrNotImplemented, Name: "not supported", Wire: "not_supported",
		HTTP: http.StatusNotImplemented, FromStatus: true, Exit: 9,
		Meaning: "not supported: the host or the runner lacks a feature, e.g. KVM, hardware virtualisation or a QEMU program; the message names it"},
	{Category: errdefs.ErrPermissionDenied, Also: []error{fs.ErrPermission}, Name: "permission denied", Wire: "permission_denied",
		HTTP: http.StatusForbidden, FromStatus: true, Exit: 10,
		Meaning: "permission denied: boxd may not open a file or device it needs, e.g. the root or /dev/kvm as a user without access"},
}

// Rows returns a copy of the table, in the order errors are tested
// against it.
func Rows() []Row {
	rows := make([]Row, len(table))
	copy(rows, table)
	return rows
}

// Of returns the row of err's category: the first row whose Category
// matches err under errors.Is, else the first whose Also does (a category
// set on purpose wins over what a wrapped fs error implies: /dev/kvm
// missing is not supported, not not found).
func Of(err error) (Row, bool) {
	if err == nil {
		return Row{}, false
	}
	for _, r := range table {
		if errors.Is(err, r.Category) {
			return r, true
		}
	}
	for _, r := range table {
		for _, a := range r.Also {
			if errors.Is(err, a) {
				return r, true
			}
		}
	}
	return Row{}, false
}

// Named returns the row whose Wire name is wire.
func Named(wire string) (Row, bool) {
	for _, r := range table {
		if r.Wire == wire {
			return r, true
		}
	}
	return Row{}, false
}

// ExitCode returns the boxd command's exit code for err: 0 for nil, the
// code of its category, or 1.
func ExitCode(err error) int {
	if err == nil {
		return ExitSuccess
	}
	if r, ok := Of(err); ok {
		return r.Exit
	}
	return ExitFailure
}

// HTTPStatus returns the HTTP status the daemon answers err with: 200 for
// nil, the status of its category, or 500.
func HTTPStatus(err error) int {
	if err == nil {
		return http.StatusOK
	}
	if r, ok := Of(err); ok {
		return r.HTTP
	}
	return http.StatusInternalServerError
}

// FromHTTP rebuilds the error of an HTTP answer that failed with status and
// message msg and named no category: msg, in the category the status alone
// stands for (the row with FromStatus), or in none (500, say, is any
// failure).
func FromHTTP(status int, msg string) error {
	if msg == "" {
		msg = fmt.Sprintf("HTTP %d %s", status, http.StatusText(status))
	}
	err := errors.New(msg)
	for _, r := range table {
		if r.FromStatus && r.HTTP == status {
			return With(err, r.Category)
		}
	}
	return err
}

// categorized keeps an error's message and chain and adds a category that
// errors.Is finds.
type categorized struct {
	error
	cat error
}

func (c categorized) Is(target error) bool { return target == c.cat }
func (c categorized) Unwrap() error        { return c.error }

// With returns err, unchanged in message and chain, that also matches
// category under errors.Is; nil for nil.
func With(err, category error) error {
	if err == nil {
		return nil
	}
	return categorized{err, category}
}

// NotSupported returns the error fmt.Errorf(format, args...) makes,
// categorised as errdefs.ErrNotImplemented: the host or a backend lacks a
// feature, which the message names.
func NotSupported(format string, args ...any) error {
	return With(fmt.Errorf(format, args...), errdefs.ErrNotImplemented)
}
