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

// LiveForks is how many of m's forks copied its memory live (livecopy.go).
func LiveForks(m *Machine) int64 { return m.liveForks.Load() }

// FailLiveCopies makes live copies fail with err once they have written
// after pages, for the rest of t, or until it is called again with nil.
func FailLiveCopies(t *testing.T, after int64, err error) {
	if err == nil {
		liveFault = nil
		return
	}
	liveFault = func(written int64) error {
		if written >= after {
			return err
		}
		return nil
	}
	t.Cleanup(func() { liveFault = nil })
}
