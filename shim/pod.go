package shim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// The annotations containerd's CRI puts on the OCI spec of a pod's
// containers (Kubernetes' RuntimeClass handler reaches the shim this way):
// one box runs the pod, made from its sandbox (pause) container; each of
// its other containers runs there, in a root file system of its own.
const (
	AnnotationContainerType    = "io.kubernetes.cri.container-type" // ContainerTypeSandbox or ContainerTypeContainer
	AnnotationSandboxID        = "io.kubernetes.cri.sandbox-id"
	AnnotationSandboxName      = "io.kubernetes.cri.sandbox-name"
	AnnotationSandboxNamespace = "io.kubernetes.cri.sandbox-namespace"
	AnnotationContainerName    = "io.kubernetes.cri.container-name"

	ContainerTypeSandbox   = "sandbox"
	ContainerTypeContainer = "container"
)

// Labels of a pod's box, beside Labels': the pod's names in Kubernetes,
// and one per container of the pod, LabelContainerPrefix and its name,
// whose value is its containerd id.
const (
	LabelPodName         = "kubernetes.pod.name"
	LabelPodNamespace    = "kubernetes.pod.namespace"
	LabelContainerPrefix = "kubernetes.container."
)

// containerLabel is the label of a pod's box for container id of the pod,
// by its spec's annotations; nil when the spec names no container.
func containerLabel(spec *specs.Spec, id string) map[string]string {
	name := spec.Annotations[AnnotationContainerName]
	if name == "" {
		return nil
	}
	return map[string]string{LabelContainerPrefix + name: id}
}

// labelKey is the key of label, "" for none.
func labelKey(label map[string]string) string {
	for k := range label {
		return k
	}
	return ""
}

// podMember is the second line of a pod container's BoxFile: the box
// named on the first is its pod's, of which it has a part alone.
const podMember = "pod-member"

// readSpec reads the OCI spec of the bundle at dir.
func readSpec(dir string) (*specs.Spec, error) {
	if dir == "" {
		return nil, fmt.Errorf("no bundle: %w", errdefs.ErrInvalidArgument)
	}
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("bundle %s: %w: %w", dir, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return nil, fmt.Errorf("bundle %s: config.json is not an OCI spec: %w: %w", dir, err, errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// sandboxOf returns the sandbox (pod) container id runs in, by its spec's
// annotations: "" for a container with a box of its own (ctr run, or a
// pod's sandbox).
func sandboxOf(spec *specs.Spec, id string) string {
	if spec.Annotations[AnnotationContainerType] != ContainerTypeContainer {
		return ""
	}
	if sb := spec.Annotations[AnnotationSandboxID]; sb != id {
		return sb
	}
	return ""
}

// podLabels returns the labels a pod's box gets from its sandbox's spec.
func podLabels(spec *specs.Spec) map[string]string {
	out := map[string]string{}
	if spec.Annotations[AnnotationContainerType] != ContainerTypeSandbox {
		return out
	}
	if n := spec.Annotations[AnnotationSandboxName]; n != "" {
		out[LabelPodName] = n
	}
	if n := spec.Annotations[AnnotationSandboxNamespace]; n != "" {
		out[LabelPodNamespace] = n
	}
	return out
}

// agentPrefix begins the agent ids of a pod container's processes, which
// share the pod's box with the other containers' (container ids have no
// ':'); a container with a box of its own has none.
func agentPrefix(id string, inPod bool) string {
	if !inPod {
		return ""
	}
	return id + ":"
}

// ownProcess says whether the kept process agentID of a box belongs to
// the container whose processes' ids begin with prefix.
func ownProcess(agentID, prefix string) bool {
	if prefix == "" {
		return !strings.Contains(agentID, ":")
	}
	return strings.HasPrefix(agentID, prefix)
}

// Pods finds the box of a pod whose sandbox this shim serves.
type Pods interface {
	// PodBox returns the box of the pod whose sandbox container is id.
	PodBox(id string) (string, error)
}

// joinPod gives container id of the pod whose sandbox is sandbox its root
// file system in the pod's box, with the box's label for it, and returns
// the box and where the root is in it.
func (s *Service) joinPod(ctx context.Context, id, sandbox, source string, label map[string]string) (string, string, error) {
	if s.cfg.Pods == nil {
		return "", "", fmt.Errorf("container %s of pod %s: this shim serves no pod: %w", id, sandbox, errdefs.ErrFailedPrecondition)
	}
	bx, err := s.cfg.Pods.PodBox(sandbox)
	if err != nil {
		return "", "", fmt.Errorf("container %s of pod %s: %w", id, sandbox, err)
	}
	root, err := s.boxes.AddRootfs(ctx, bx, id, source, label)
	if err != nil {
		return "", "", fmt.Errorf("putting container %s's root file system in box %s: %w", id, bx, createError(err))
	}
	return bx, root, nil
}

// leavePod takes container id's processes, root file system and label
// (labelKey) out of its pod's box bx; a box or part already gone is no
// error.
func leavePod(ctx context.Context, boxes Boxes, bx, id, labelKey string) error {
	list, err := boxes.Processes(ctx, bx)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil // the box is gone, or stopped: nothing of the container runs
	}
	if err != nil {
		return fmt.Errorf("listing the processes of box %s: %w", bx, err)
	}
	var errs []error
	for _, p := range list {
		if ownProcess(p.ID, agentPrefix(id, true)) {
			if err := boxes.ForgetProcess(ctx, bx, p.ID); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				errs = append(errs, fmt.Errorf("forgetting process %s: %w", p.ID, err))
			}
		}
	}
	if err := boxes.RemoveRootfs(ctx, bx, id, labelKey); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		errs = append(errs, fmt.Errorf("taking container %s's root file system out of box %s: %w", id, bx, err))
	}
	return errors.Join(errs...)
}

// podShim returns the address of the shim that serves the pod container
// o.id is in, if it is one: containerd then sends the container's task to
// that shim, which runs the pod's box.
func podShim(o options) (string, bool, error) {
	spec, err := readSpec(o.bundle)
	if err != nil {
		return "", false, nil // Create says what is wrong with the bundle
	}
	sandbox := sandboxOf(spec, o.id)
	if sandbox == "" {
		return "", false, nil
	}
	so := o
	so.id = sandbox
	path := socketPath(so)
	conn, err := net.Dial("unix", path)
	if err != nil {
		return "", true, fmt.Errorf("container %s of pod %s: the pod's shim does not answer on %s: %w", o.id, sandbox, path, errdefs.ErrFailedPrecondition)
	}
	_ = conn.Close()
	return "unix://" + path, true, nil
}
