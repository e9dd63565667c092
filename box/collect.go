package box

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/boxd-dev/boxd/runner/qemu"
)

// diskName matches the disk files of a box: NAME-XXXXXXXX.qcow2, and the
// overlays its snapshots froze, NAME-XXXXXXXX@SNAPSHOT.qcow2.
var diskName = regexp.MustCompile(`^([a-z0-9-]+)-[0-9a-f]{8}(@.*)?\.qcow2$`)

// collect removes what removed boxes left behind that nothing needs any
// more: their snapshots that no other snapshot builds on and no box stands
// on (with their frozen memory and exported disks), and their disk
// overlays that are in no remaining box's chain and that no remaining
// snapshot names. What a removed box's forks stand on stays until they
// are removed too. The chunks stay in the store until `boxd store gc`.
func (m *Manager) collect(ctx context.Context) {
	// A snapshot still on its way to the store may build on one of them.
	if err := m.runner.Flush(ctx); err != nil {
		m.log.Warn("box: collecting removed boxes' snapshots", "err", err)
	}
	g := m.cfg.Graph
	// The disk files first, then the boxes: a box's record is written
	// before its disk (Create, Fork, CreateFrom), so a file listed here
	// that belongs to a box is in the list below.
	files, err := os.ReadDir(disksDir(m.cfg.Root))
	if err != nil {
		return
	}
	boxes, err := m.List()
	if err != nil {
		return
	}
	exists := map[string]bool{}
	standOn := map[string]bool{}
	for _, b := range boxes {
		exists[b.Name] = true
		standOn[b.Snapshot] = true
	}
	// Snapshots on their way to the store (a fork that began after the
	// Flush) and the parents they build on.
	for _, s := range m.runner.Pending() {
		standOn[s] = true
	}
	exports := filepath.Join(m.cfg.Root, "run", "disks")
	for removed := true; removed; {
		removed = false
		snaps, err := g.List()
		if err != nil {
			return
		}
		for _, s := range snaps {
			owner := s.Labels[LabelBox]
			if owner == "" || exists[owner] || !strings.HasPrefix(s.Name, "box."+owner+".") || standOn[s.Name] {
				continue
			}
			if kids, err := g.Children(s.Name); err != nil || len(kids) > 0 {
				continue
			}
			if err := g.Remove(s.Name); err != nil {
				m.log.Warn("box: removing a removed box's snapshot", "snapshot", s.Name, "err", err)
				continue
			}
			m.runner.DropFrozen(s.Name)
			_ = os.Remove(filepath.Join(exports, "snap-"+s.Name+".raw"))
			removed = true
		}
	}

	keep := map[string]bool{}
	for _, b := range boxes {
		for _, f := range qemu.BackingChain(b.Disk) {
			keep[f] = true
		}
	}
	snaps, err := g.List()
	if err != nil {
		return
	}
	for _, s := range snaps {
		if d := s.Labels[qemu.LabelDisk]; d != "" {
			for _, f := range qemu.BackingChain(d) {
				keep[f] = true
			}
		}
	}
	for _, f := range files {
		path := filepath.Join(disksDir(m.cfg.Root), f.Name())
		if d := diskName.FindStringSubmatch(f.Name()); d != nil && !exists[d[1]] && !keep[path] {
			_ = os.Remove(path)
		}
	}
}
