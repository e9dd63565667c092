package daemon

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"
)

// Bounds on a box's labels (CreateRequest.Labels).
const (
	maxLabels     = 32
	maxLabelKey   = 128
	maxLabelValue = 1024
)

// checkLabels says why labels cannot be a box's, if they cannot.
func checkLabels(labels map[string]string) error {
	if len(labels) > maxLabels {
		return fmt.Errorf("%d labels: at most %d: %w", len(labels), maxLabels, errdefs.ErrInvalidArgument)
	}
	for k, v := range labels {
		if k == "" || len(k) > maxLabelKey || len(v) > maxLabelValue {
			return fmt.Errorf("label %.40q: want a key of 1 to %d bytes and a value of at most %d: %w", k, maxLabelKey, maxLabelValue, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// rootfsBase is the snapshot the root file system req.Rootfs starts from.
func (s *Server) rootfsBase(ctx context.Context, req CreateRequest, owner string) (string, error) {
	switch {
	case owner != "":
		return "", fmt.Errorf("root file system %s: a box made over SSH starts from an image: %w", req.Rootfs, errdefs.ErrPermissionDenied)
	case req.Image != "" || req.From != "":
		return "", fmt.Errorf("a box made from root file system %s has no image or snapshot to start from too: %w", req.Rootfs, errdefs.ErrInvalidArgument)
	case s.rootfs == nil:
		return "", fmt.Errorf("root file system %s: this daemon serves no containerd snapshotter (boxd daemon --containerd-snapshotter SOCK), whose root file systems alone a box can start from: %w", req.Rootfs, errdefs.ErrFailedPrecondition)
	}
	base, err := s.rootfs(ctx, req.Rootfs)
	if err != nil {
		return "", fmt.Errorf("root file system: %w", err)
	}
	return base, nil
}
