package benchkit

import (
	"context"
	"slices"
	"time"
)

// Settle waits until the root's QEMU processes have stayed the same for a
// second, at most 30 s: after a fork or a resume the daemon starts spare
// machines for the box's next fork, and a timed operation should neither
// share the CPUs with their start nor find them not ready yet.
func (b Boxd) Settle(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	_, last := b.QEMUs(ctx)
	since := time.Now()
	for time.Since(since) < time.Second && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if _, now := b.QEMUs(ctx); !slices.Equal(now, last) {
			last, since = now, time.Now()
		}
	}
	return nil
}
