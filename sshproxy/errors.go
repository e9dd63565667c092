package sshproxy

import (
	"errors"
	"io/fs"
	"syscall"

	"github.com/containerd/errdefs"
)

// ErrServerClosed is returned by [Server.Serve] after [Server.Close].
var ErrServerClosed = errors.New("ssh proxy closed")

// categorized keeps an error's message and chain and adds a category that
// errors.Is finds, so messages stay one clean sentence.
type categorized struct {
	error
	cat error
}

func (c categorized) Is(target error) bool { return target == c.cat }
func (c categorized) Unwrap() error        { return c.error }

func withCategory(err, cat error) error {
	if err == nil {
		return nil
	}
	return categorized{err, cat}
}

// fsCategory adds the errdefs category of a file-system error a person can
// cause or fix: missing paths, permissions, a full disk.
func fsCategory(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return withCategory(err, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrPermission):
		return withCategory(err, errdefs.ErrPermissionDenied)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return withCategory(err, errdefs.ErrResourceExhausted)
	}
	return err
}
