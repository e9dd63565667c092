package daemon

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path"
	"regexp"

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
	base, err := s.rootfs.Base(ctx, req.Rootfs)
	if err != nil {
		return "", fmt.Errorf("root file system: %w", err)
	}
	return base, nil
}

// Rootfs is what the API needs of the daemon's containerd snapshotter
// (Config.ContainerdSnapshotter).
type Rootfs interface {
	// Base is the snapshot of the store the root file system at source
	// (the Source of a mount the snapshotter handed out) starts from.
	Base(ctx context.Context, source string) (string, error)
	// Extract writes the files of the root file system at source into
	// dir, an empty folder.
	Extract(ctx context.Context, source, dir string) error
}

// RootfsRequest is the body of POST /v1/boxes/{name}/rootfs: a root file
// system of the daemon's containerd snapshotter to put in the box, for a
// process of container ID to run in (agent.ProcessSpec.Root).
type RootfsRequest struct {
	ID     string `json:"id"`
	Rootfs string `json:"rootfs"` // the Source of a mount the snapshotter handed out
	// Label, when set, is a label the box gets while it holds the root
	// file system (Box.Labels): {"KEY": "VALUE"}, at most one.
	Label map[string]string `json:"label,omitempty"`
}

// RootfsResult is what POST /v1/boxes/{name}/rootfs answers: where the
// root file system is in the box.
type RootfsResult struct {
	Path string `json:"path"`
}

// containerIDRE is what a container ID may be: containerd's rule.
var containerIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,75}$`)

// ContainerRoot is where container id's root file system is in a box
// (POST /v1/boxes/{name}/rootfs).
func ContainerRoot(id string) string { return "/.boxd/containers/" + id + "/rootfs" }

// addRootfs puts a container's root file system in a box: the
// snapshotter's image is read on the host without mounting it, and its
// files are copied into the box's own disk, so that the box's snapshots,
// forks and hibernation keep them.
func (s *Server) addRootfs(w http.ResponseWriter, r *http.Request) {
	var req RootfsRequest
	name, err := boxName(r)
	if err == nil {
		err = decode(w, r, maxRequestBody, &req)
	}
	if err == nil && ownerOf(r) != "" {
		err = fmt.Errorf("root file system: a box made over SSH is given none: %w", errdefs.ErrPermissionDenied)
	}
	if err == nil && !containerIDRE.MatchString(req.ID) {
		err = fmt.Errorf("container id %.80q: want 1 to 76 letters, digits, '_', '.' and '-', a letter or digit first: %w", req.ID, errdefs.ErrInvalidArgument)
	}
	if err == nil && len(req.Label) > 1 {
		err = fmt.Errorf("%d labels for a root file system: at most one: %w", len(req.Label), errdefs.ErrInvalidArgument)
	}
	if err == nil {
		err = checkLabels(req.Label)
	}
	if err == nil && s.rootfs == nil {
		err = fmt.Errorf("root file system %s: this daemon serves no containerd snapshotter (boxd daemon --containerd-snapshotter SOCK), whose root file systems alone a box can be given: %w", req.Rootfs, errdefs.ErrFailedPrecondition)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	ctx, cancel := s.opContext(r)
	defer cancel()
	if _, err := s.mgr.Get(name); err != nil {
		s.fail(w, r, err)
		return
	}
	dir, err := os.MkdirTemp(s.info.Root, rootfsTemp+"*")
	if err != nil {
		s.fail(w, r, fmt.Errorf("root file system: %w", err))
		return
	}
	defer os.RemoveAll(dir)
	if err := s.rootfs.Extract(ctx, req.Rootfs, dir); err != nil {
		s.fail(w, r, fmt.Errorf("root file system: %w", err))
		return
	}
	path := ContainerRoot(req.ID)
	if err := s.mgr.PutTree(ctx, name, dir, path); err != nil {
		s.fail(w, r, err)
		return
	}
	for k, v := range req.Label {
		if err := s.mgr.SetLabel(name, k, v); err != nil {
			s.fail(w, r, err)
			return
		}
	}
	s.touch(name)
	s.reply(w, RootfsResult{Path: path})
}

// removeRootfs takes a container's root file system out of a box, and the
// label given with it (the query's label=KEY).
func (s *Server) removeRootfs(w http.ResponseWriter, r *http.Request) {
	name, err := boxName(r)
	id := r.PathValue("id")
	if err == nil && !containerIDRE.MatchString(id) {
		err = fmt.Errorf("container id %.80q: %w", id, errdefs.ErrInvalidArgument)
	}
	if err == nil {
		err = s.checkOwned(r, name)
	}
	if err == nil {
		ctx, cancel := s.opContext(r)
		err = s.mgr.RemoveTree(ctx, name, path.Dir(ContainerRoot(id)))
		if key := r.URL.Query().Get("label"); err == nil && key != "" {
			err = s.mgr.SetLabel(name, key, "")
		}
		cancel()
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, struct{}{})
}

// rootfsTemp begins the names of the folders under the root that root
// file systems are extracted to on their way into a box; a daemon that
// starts removes those a killed one left.
const rootfsTemp = ".rootfs-"

// AddRootfs puts the root file system at source (a mount of the daemon's
// containerd snapshotter) in box name for container id, and returns where
// it is in the box.
func (c *Client) AddRootfs(ctx context.Context, name, id, source string, label map[string]string) (string, error) {
	var out RootfsResult
	err := c.do(ctx, http.MethodPost, boxPath(name)+"/rootfs", RootfsRequest{ID: id, Rootfs: source, Label: label}, &out)
	return out.Path, err
}

// RemoveRootfs takes container id's root file system out of box name, and
// the box's label labelKey ("" for none).
func (c *Client) RemoveRootfs(ctx context.Context, name, id, labelKey string) error {
	path := boxPath(name) + "/rootfs/" + url.PathEscape(id)
	if labelKey != "" {
		path += "?label=" + url.QueryEscape(labelKey)
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}
