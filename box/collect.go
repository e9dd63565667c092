package box

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// diskName matches the disk files the manager names (newDiskPath):
// NAME-XXXXXXXX.EXT. Files a runner derived from one (the layers its
// snapshots froze) are traced back to it with runner.DiskFiles.DiskOrigin.
var diskName = regexp.MustCompile(`^([a-z0-9-]+)-[0-9a-f]{8}\.[a-z0-9]+$`)

// diskOwner is the box whose disk file path is, or was made from; "" for
// a file that is no box's.
func (m *Manager) diskOwner(path string) string {
	for _, df := range m.diskFiles() {
		if o := df.DiskOrigin(path); o != "" {
			path = o
			break
		}
	}
	if d := diskName.FindStringSubmatch(filepath.Base(path)); d != nil {
		return d[1]
	}
	return ""
}

// collect removes what removed boxes left behind that nothing needs any
// more: their snapshots that no other snapshot builds on and no box stands
// on (with their frozen memory and exported disks), and their disk
// overlays that are in no remaining box's chain and that no remaining
// snapshot names. What a removed box's forks stand on stays until they
// are removed too. The chunks stay in the store until `boxd store gc`.
func (m *Manager) collect(ctx context.Context) {
	// A snapshot still on its way to the store may build on one of them.
	if err := m.Flush(ctx); err != nil {
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
	for _, s := range m.pending() {
		standOn[s] = true
	}
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
			m.removed(s.Name)
			removed = true
		}
	}

	keep := map[string]bool{}
	for _, b := range boxes {
		for _, f := range m.diskChain(b.Disk) {
			keep[f] = true
		}
	}
	snaps, err := g.List()
	if err != nil {
		return
	}
	for _, s := range snaps {
		if d := m.snapshotDisk(s); d != "" {
			for _, f := range m.diskChain(d) {
				keep[f] = true
			}
		}
	}
	for _, f := range files {
		path := filepath.Join(disksDir(m.cfg.Root), f.Name())
		if owner := m.diskOwner(path); owner != "" && !exists[owner] && !keep[path] {
			_ = os.Remove(path)
		}
	}
}
