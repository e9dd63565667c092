package qemu

import (
	"context"
	"encoding/json"
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

// LiveTracked says whether m's QEMU tracks dirty pages soundly enough for
// live copies (livecopy.go).
func LiveTracked(m *Machine) bool { return m.liveTracked() }

// ForceLiveCopies lets live copies run, for the rest of t, where
// LiveTracked says QEMU loses pages the guest writes during them.
func ForceLiveCopies(t testing.TB) {
	liveForced.Store(true)
	t.Cleanup(func() { liveForced.Store(false) })
}

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

// HMP runs a human monitor command on m.
func HMP(m *Machine, cmd string) string {
	raw, err := m.qmp.execute(context.Background(), "human-monitor-command", map[string]any{"command-line": cmd})
	if err != nil {
		return err.Error()
	}
	return string(raw)
}

// Version is the QEMU version m's QMP greeting gave.
func Version(m *Machine) string {
	m.qmpMu.Lock()
	defer m.qmpMu.Unlock()
	return m.qmp.version.String()
}

// SerialPorts is how many ports m's virtio-serial device offers the guest
// (its max_ports, as QEMU has it).
func SerialPorts(ctx context.Context, m *Machine) (int, error) {
	raw, err := m.qmp.execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/vser0", "property": "max_ports"})
	if err != nil {
		return 0, err
	}
	var n int
	err = json.Unmarshal(raw, &n)
	return n, err
}

// SetFlatten sets, for the rest of t, how long after a snapshot or a
// restore a machine's disk chain is looked at and how fast its stream job
// copies (flatten.go).
func SetFlatten(t testing.TB, delay time.Duration, speed int64) {
	oldDelay, oldSpeed := flattenDelay.Load(), flattenSpeed.Load()
	flattenDelay.Store(int64(delay))
	flattenSpeed.Store(speed)
	t.Cleanup(func() {
		flattenDelay.Store(oldDelay)
		flattenSpeed.Store(oldSpeed)
	})
}

// FlattenRuns says whether m's disk stream job runs in QEMU.
func FlattenRuns(ctx context.Context, m *Machine) (bool, error) { return m.flattenRuns(ctx) }
