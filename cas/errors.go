package cas

import "github.com/containerd/errdefs"

// Error categories. Every error the store returns wraps one of these, so
// callers decide with errors.Is and translate once, at the edge (a CLI exit
// code, a gRPC status).
var (
	ErrNotFound           = errdefs.ErrNotFound
	ErrAlreadyExists      = errdefs.ErrAlreadyExists
	ErrInvalidArgument    = errdefs.ErrInvalidArgument
	ErrFailedPrecondition = errdefs.ErrFailedPrecondition
	// ErrCorrupt marks stored data that fails its checksum or hash.
	ErrCorrupt = errdefs.ErrDataLoss
	// ErrNoSpace marks a write that ran out of disk.
	ErrNoSpace = errdefs.ErrResourceExhausted
	// ErrUnavailable marks a store held by another process.
	ErrUnavailable = errdefs.ErrUnavailable
)

// categorized keeps an error's message and chain and adds a category that
// errors.Is finds.
type categorized struct {
	error
	cat error
}

func (c categorized) Is(target error) bool { return target == c.cat }
func (c categorized) Unwrap() error        { return c.error }

// WithCategory returns err, unchanged in message and chain, that also matches
// cat under errors.Is.
func WithCategory(err, cat error) error {
	if err == nil {
		return nil
	}
	return categorized{err, cat}
}
