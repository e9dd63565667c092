package qemu

import (
	"testing"
	"time"

	"github.com/boxd-dev/boxd/runner"
)

// DropQMP closes m's QMP connection, as a process that dies does.
func DropQMP(m *Machine) {
	m.qmpMu.Lock()
	defer m.qmpMu.Unlock()
	_ = m.qmp.close()
}

// RefillResumeSpares starts resume spares for machines of spec, in the background.
func (r *Runner) RefillResumeSpares(spec runner.Spec) { r.refillResumeSpares(spec) }

// SetMaxWriteHold sets how long SnapshotOptions.WriteAfter may hold a write back, for the rest of t.
func SetMaxWriteHold(t *testing.T, d time.Duration) {
	old := maxWriteHold
	maxWriteHold = d
	t.Cleanup(func() { maxWriteHold = old })
}
