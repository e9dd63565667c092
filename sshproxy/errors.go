package sshproxy

import (
	"errors"
	"io/fs"
	"syscall"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
)

// ErrServerClosed is returned by [Server.Serve] after [Server.Close].
var ErrServerClosed = errors.New("ssh proxy closed")

// fsCategory adds the errdefs category of a file-system error a person can
// cause or fix: missing paths, permissions, a full disk.
func fsCategory(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, fs.ErrNotExist):
		return errcat.With(err, errdefs.ErrNotFound)
	case errors.Is(err, fs.ErrPermission):
		return errcat.With(err, errdefs.ErrPermissionDenied)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return errcat.With(err, errdefs.ErrResourceExhausted)
	}
	return err
}
