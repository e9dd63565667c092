package box

import (
	"context"
	"errors"
	"fmt"

	"github.com/boxd-dev/boxd/guest"
	"github.com/containerd/errdefs"
)

// Receive records bx, a hibernated box whose state came from another
// root (its snapshot, and those it stands on, already in this root's
// graph), so that Resume restores it here. The kernel and initramfs its
// machine was booted with are made ready in this root first. A record of
// the name already here is replaced only when that box is hibernated too
// (an older state of the same box); a running one is refused.
func (m *Manager) Receive(ctx context.Context, bx Box) (Box, error) {
	if err := ValidateName(bx.Name); err != nil {
		return Box{}, err
	}
	unlock := m.lock(bx.Name)
	defer unlock()
	if old, err := m.Get(bx.Name); err == nil && old.State != StateHibernated {
		return old, fmt.Errorf("box %s is %s here: %w", bx.Name, old.State, ErrExists)
	} else if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return Box{}, err
	}
	if bx.Snapshot == "" {
		return Box{}, fmt.Errorf("box %s has no snapshot to resume from: %w", bx.Name, errdefs.ErrInvalidArgument)
	}
	if _, err := m.cfg.Graph.Get(bx.Snapshot); err != nil {
		return Box{}, fmt.Errorf("box %s: %w", bx.Name, err)
	}
	m.fill(&bx)
	if _, err := m.runnerOf(bx); err != nil {
		return Box{}, err
	}
	// A restore starts the machine with the kernel and initramfs of its
	// snapshot's spec, which name files of this root's cache.
	_, modules, err := guest.Kernel(ctx, m.cfg.Root, m.cfg.Kernel)
	if err != nil {
		return Box{}, err
	}
	agentPath, err := guest.AgentPath()
	if err != nil {
		return Box{}, err
	}
	if _, err := guest.Initramfs(ctx, m.cfg.Root, modules, agentPath); err != nil {
		return Box{}, err
	}
	bx.State, bx.Disk, bx.Note = StateHibernated, "", ""
	if err := m.put(bx); err != nil {
		return Box{}, err
	}
	return bx, nil
}
