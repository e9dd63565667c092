package qemu

import (
	"context"
	"fmt"
)

// StartMoveSpares starts n spares on the machine's own memory file, mapped copy-on-write, for a fork that ends
// the machine in its snapshot (Freeze) instead of copying its memory: Freeze makes that very file the snapshot's
// frozen file, and the restores of the snapshot (the machine going on, and its forks) take the spares instead of
// starting QEMU. A spare reads nothing of the file before it runs, so it sees the memory as frozen. A machine on a
// private mapping owns no file and starts none. The spares stop with the machine if it ends without a freeze,
// and with the frozen file (ReleaseSnapshot) if no restore takes them.
func (m *Machine) StartMoveSpares(ctx context.Context, n int) error {
	if m.stopped() {
		return m.exit
	}
	if m.private {
		return nil
	}
	spec := m.specLabel()
	for range n {
		sp, err := m.r.launch(ctx, spec, launchOptions{memFile: m.memFile, incoming: true})
		if err != nil {
			return fmt.Errorf("qemu: a spare for %s: %w", m.id, err)
		}
		m.r.addSpare(m.memFile, sp)
		if m.stopped() && !m.frozen.Load() { // it ended meanwhile (exited stopped the spares before this one)
			m.r.stopSpares(m.memFile)
			return nil
		}
	}
	return nil
}

// ownedByLive says whether path is the own memory file of a machine that runs: a spare on it that ends must
// leave it.
func (r *Runner) ownedByLive(path string) bool {
	r.liveMu.Lock()
	defer r.liveMu.Unlock()
	for _, m := range r.live {
		if !m.private && m.memFile == path && !m.stopped() {
			return true
		}
	}
	return false
}
