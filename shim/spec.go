package shim

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/boxd-dev/boxd/agent"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// readBundle reads the OCI spec of the bundle at dir and returns its
// process as a kept process's spec, with the box's hostname.
func readBundle(dir string) (agent.ProcessSpec, error) {
	if dir == "" {
		return agent.ProcessSpec{}, fmt.Errorf("no bundle: %w", errdefs.ErrInvalidArgument)
	}
	data, err := os.ReadFile(filepath.Join(dir, "config.json"))
	if err != nil {
		return agent.ProcessSpec{}, fmt.Errorf("bundle %s: %w: %w", dir, err, errdefs.ErrInvalidArgument)
	}
	var spec specs.Spec
	if err := json.Unmarshal(data, &spec); err != nil {
		return agent.ProcessSpec{}, fmt.Errorf("bundle %s: config.json is not an OCI spec: %w: %w", dir, err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil {
		return agent.ProcessSpec{}, fmt.Errorf("bundle %s: config.json has no process: %w", dir, errdefs.ErrInvalidArgument)
	}
	ps, err := processSpec(spec.Process)
	if err != nil {
		return agent.ProcessSpec{}, fmt.Errorf("bundle %s: %w", dir, err)
	}
	ps.Hostname = spec.Hostname
	return ps, nil
}

// processSpec turns an OCI process into a kept process's spec (its ID and
// Hostname left to the caller).
func processSpec(p *specs.Process) (agent.ProcessSpec, error) {
	if len(p.Args) == 0 || p.Args[0] == "" {
		return agent.ProcessSpec{}, fmt.Errorf("the process has no arguments: %w", errdefs.ErrInvalidArgument)
	}
	ps := agent.ProcessSpec{
		Args:           p.Args,
		Env:            p.Env,
		Cwd:            p.Cwd,
		UID:            p.User.UID,
		GID:            p.User.GID,
		AdditionalGids: p.User.AdditionalGids,
		Terminal:       p.Terminal,
	}
	if p.ConsoleSize != nil {
		ps.Rows, ps.Cols = int(p.ConsoleSize.Height), int(p.ConsoleSize.Width)
	}
	return ps, nil
}

// execSpec decodes an exec's process, which containerd sends as JSON.
func execSpec(data []byte) (agent.ProcessSpec, error) {
	var p specs.Process
	if err := json.Unmarshal(data, &p); err != nil {
		return agent.ProcessSpec{}, fmt.Errorf("the exec's process is not an OCI process: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	return processSpec(&p)
}

// rootfsSource returns the image of boxd's snapshotter that mounts are:
// exactly one loop mount of an ext4 image file under
// ROOT/containerd/images. Any other snapshotter's are refused: the box
// boots from the image, and the shim never mounts it on the host.
func rootfsSource(mounts []*types.Mount) (string, error) {
	if len(mounts) != 1 {
		return "", fmt.Errorf("the root file system is %d mounts; boxd runs containers on one image of its snapshotter (ctr run --snapshotter boxd): %w",
			len(mounts), errdefs.ErrInvalidArgument)
	}
	m := mounts[0]
	dir := filepath.Dir(m.Source)
	if m.Type != "ext4" || !slices.Contains(m.Options, "loop") ||
		filepath.Base(dir) != "images" || filepath.Base(filepath.Dir(dir)) != "containerd" {
		return "", fmt.Errorf("the root file system is a %s mount of %s, not an image of boxd's snapshotter: run the container with --snapshotter boxd: %w",
			m.Type, m.Source, errdefs.ErrInvalidArgument)
	}
	return m.Source, nil
}
