package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// A machine's disk is a chain of qcow2 files over a raw base image, and
// every snapshot of the machine adds one: the top it froze stays under the
// new top. QEMU opens the whole chain when a restore adds the disk and again
// when it activates it after the device state, about 1.3 ms a file on a
// small host, so a box that hibernated and resumed a hundred times would
// resume 130 ms slower, and hold a file open per hibernation.
//
// So a machine whose chain holds more than Runner.DiskLayers layers over its
// base has QEMU stream the layers' data into its top (block-stream), in the
// background 20 s after a snapshot of it or after its restore, once its
// memory is in place: all layers but the lowest. When the job ends the top
// reads from the lowest layer, which reads from the base, and the next
// snapshot freezes a chain of three files. The layers stay as they are:
// older snapshots name them. A snapshot cancels a job still
// running (what it copied stays in the top, correct either way) and the
// next trigger starts another.
//
// A fork's children (restores made unique) allow one layer more: they
// start on the parent's chain and a layer of their own, and the parent,
// which streams first (after its snapshot, or its restore when it moved
// onto the fork's frozen memory), leaves them under the bound, so that ten
// children do not each copy the parent's disk.

// DefaultDiskLayers is Runner.DiskLayers' default: a box that hibernates
// when idle resumes on at most eight files, about 6 ms more than on the
// fewest (four).
const DefaultDiskLayers = 6

const flattenJob = "boxd-flatten" // the stream job's id

// flattenReserve is the disk a stream leaves free beside what it may write.
const flattenReserve = 1 << 30

// The stream job's pace (tests change them).
var (
	// flattenDelay is how long after a snapshot, or after a restored
	// machine holds all its memory, the chain is looked at, in ns: off
	// the paths that wait for the machine, and long enough that a
	// machine snapshotted again at once (a box hibernated right after a
	// command woke it) does not start a stream that its next snapshot
	// cancels, each time leaving a part of its data copied once more in
	// the layer that snapshot freezes.
	flattenDelay atomic.Int64
	// flattenSpeed bounds the job's copy, bytes a second, to leave the
	// guest most of the disk: a box with 1 GiB of its own data streams
	// in about 4 s.
	flattenSpeed atomic.Int64
)

func init() {
	flattenDelay.Store(int64(20 * time.Second))
	flattenSpeed.Store(256 << 20)
}

// diskLayers is the bound on a machine's qcow2 layers (Runner.DiskLayers).
func (r *Runner) diskLayers() int {
	if r.DiskLayers == 0 {
		return DefaultDiskLayers
	}
	return r.DiskLayers
}

// flattenLater looks at m's disk chain after flattenDelay (and after its
// lazy restore) and streams it when it holds more than Runner.DiskLayers
// and extra layers over its base.
func (m *Machine) flattenLater(extra int) {
	layers := m.r.diskLayers()
	if layers < 0 {
		return
	}
	layers += extra
	go func() {
		if m.lazy.Load() != nil {
			select {
			case <-m.restored:
			case <-m.done:
				return
			}
		}
		select {
		case <-time.After(time.Duration(flattenDelay.Load())):
		case <-m.done:
			return
		}
		m.flatten(layers)
	}()
}

// flatten starts the job that streams m's layers into its top, when its
// chain holds more than layers layers over its base and no job runs. The
// lowest layer stays under the top: it holds what the box wrote before its
// first snapshot, usually most of its own data (what it installed), so the
// job copies only what came after.
func (m *Machine) flatten(layers int) {
	m.snapMu.Lock()
	defer m.snapMu.Unlock()
	if m.flattening || m.stopped() || m.stopping.Load() {
		return
	}
	chain := BackingChain(m.disk) // the top first, the base image last
	if len(chain)-1 <= layers || len(chain) < 4 {
		return
	}
	if b, err := backingFile(chain[len(chain)-1]); err != nil || b != "" {
		return // a file missing under the chain: not one the runner made
	}
	base := chain[len(chain)-2]
	// The job writes at most what the layers between the top and the
	// lowest hold: it waits for a later trigger while the disk has less
	// free beside flattenReserve, which the guests' own writes need more.
	need := allocated(chain[1 : len(chain)-2])
	if free, err := freeSpace(filepath.Dir(m.disk)); err == nil && free < need+flattenReserve {
		m.r.logger().Warn("qemu: not streaming the disk's layers into its top: too little disk free",
			"id", m.id, "layers", len(chain)-1, "need_mib", need>>20, "free_mib", free>>20)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := m.qmp.execute(ctx, "block-stream", map[string]any{
		"job-id": flattenJob, "device": "disk0", "base": base, "speed": flattenSpeed.Load(),
	}); err != nil {
		if !m.stopped() {
			m.r.logger().Warn("qemu: streaming the disk's layers into its top", "id", m.id, "layers", len(chain)-1, "err", err)
		}
		return
	}
	m.flattening = true
	m.r.logger().Info("qemu: streaming the disk's layers into its top", "id", m.id, "layers", len(chain)-1)
}

// blockJob is what query-block-jobs says of one job that boxd reads: its
// id (QMP's "device").
type blockJob struct {
	Device string `json:"device"`
}

// flattenRuns says whether m's stream job is still in QEMU.
func (m *Machine) flattenRuns(ctx context.Context) (bool, error) {
	raw, err := m.qmp.execute(ctx, "query-block-jobs", nil)
	if err != nil {
		return false, err
	}
	var jobs []blockJob
	if err := json.Unmarshal(raw, &jobs); err != nil {
		return false, fmt.Errorf("query-block-jobs: %w", err)
	}
	for _, j := range jobs {
		if j.Device == flattenJob {
			return true, nil
		}
	}
	return false, nil
}

// stopFlatten cancels m's stream job if it still runs and waits until QEMU
// lets go of the disk: a snapshot freezes the top, which a job holds. The
// caller holds snapMu.
func (m *Machine) stopFlatten(ctx context.Context) error {
	if !m.flattening {
		return nil
	}
	runs, err := m.flattenRuns(ctx)
	if err != nil {
		return fmt.Errorf("qemu: %s: the disk's stream job: %w", m.id, err)
	}
	if runs {
		// It may end on its own meanwhile: then the cancel fails and the
		// wait below finds no job.
		_, cancelErr := m.qmp.execute(ctx, "block-job-cancel", map[string]any{"device": flattenJob})
		for runs {
			select {
			case <-ctx.Done():
				return fmt.Errorf("qemu: %s: cancelling the disk's stream job: %w", m.id, ctx.Err())
			case <-time.After(time.Millisecond):
			}
			if runs, err = m.flattenRuns(ctx); err != nil {
				return fmt.Errorf("qemu: %s: the disk's stream job: %w", m.id, err)
			}
		}
		m.r.logger().Debug("qemu: stopped streaming the disk's layers for a snapshot", "id", m.id, "cancel", cancelErr)
	}
	m.flattening = false
	return nil
}

// allocated is the disk space files take, 0 for those it cannot stat.
func allocated(files []string) int64 {
	var n int64
	for _, f := range files {
		var st unix.Stat_t
		if unix.Stat(f, &st) == nil {
			n += st.Blocks * 512
		}
	}
	return n
}

// freeSpace is what an unprivileged writer may still write to the file
// system of dir.
func freeSpace(dir string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}
