package box

import (
	"fmt"

	"github.com/boxd-dev/boxd/internal/procstat"
	"github.com/containerd/errdefs"
)

// Admission control: before it starts machines, the manager estimates the
// host memory they need and refuses what cannot fit, rather than let the
// kernel's OOM killer choose.

// MachineOverhead is the host memory one machine takes beside its guest
// memory: QEMU itself, its translated code under TCG and the first pages a
// restored guest writes. A booted 512 MiB Debian box's QEMU held about 130
// MiB besides the guest's pages, a fork of a hibernated one about 60 MiB.
const MachineOverhead = 128 << 20

// minReserve is the least memory boxd leaves the host (see Config.Reserve).
const minReserve = 1 << 30

// reserve is the memory boxd keeps free for the host: Config.Reserve, or
// by default 1 GiB or a twentieth of the host's RAM, whichever is more.
func (m *Manager) reserve() int64 {
	if m.cfg.Reserve != 0 {
		return max(m.cfg.Reserve, 0)
	}
	total, err := procstat.MemTotal()
	if err != nil {
		return minReserve
	}
	return max(minReserve, total/20)
}

// available is the memory the host can give now.
func (m *Manager) available() (int64, error) {
	if m.cfg.HostMemory != nil {
		return m.cfg.HostMemory()
	}
	return procstat.MemAvailable()
}

// admit refuses what, an operation that needs about need bytes of host
// memory, when that is more than the host has beyond the reserve.
func (m *Manager) admit(what string, need int64) error {
	avail, err := m.available()
	if err != nil {
		m.log.Warn("box: cannot tell the host's free memory; admitting", "op", what, "err", err)
		return nil
	}
	reserve := m.reserve()
	if need > avail-reserve {
		return fmt.Errorf("%s needs about %s of memory; %s available; boxd keeps %s in reserve: %w",
			what, gib(need), gib(avail), gib(reserve), errdefs.ErrResourceExhausted)
	}
	return nil
}

// bootNeed is what a machine with guest memory mem that may touch all of
// it needs: a booted or resumed box.
func bootNeed(mem int64) int64 { return mem + MachineOverhead }

// forkNeed is what n forks of a box with guest memory mem need: one
// memory image they share (copy-on-write) and a machine each; the pages
// they write later are their own.
func forkNeed(mem int64, n int) int64 { return mem + int64(n)*MachineOverhead }

// gib writes n bytes as GiB with one decimal.
func gib(n int64) string { return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30)) }
