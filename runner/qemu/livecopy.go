package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"
)

// A fork of a running machine on its own memory file copies that file into
// the fork's prepared file while the guest runs. Copying it as a file
// (precopy, then catchUp comparing every page while the guest is stopped)
// costs the stopped guest time in proportion to its memory. liveCopy uses
// QEMU's own dirty tracking instead: a live migration that carries the
// guest RAM (x-ignore-shared off) into boxd, which writes the pages into
// the prepared file, pass after pass, until QEMU stops the guest with few
// pages left (downtime-limit). It pauses there (pause-before-switchover),
// so that the disk is frozen at the very point the memory stops, then sends
// the pages still dirty and the device state. The stopped guest waits for
// O(pages dirtied in the last pass) plus its device state.

const (
	// liveDowntime is the downtime-limit, in ms, of a live copy: QEMU
	// stops the guest once the pages left would take about this long to
	// send.
	liveDowntime = 10
	// liveBudget bounds the passes: a guest that dirties memory faster than
	// it goes out is stopped after this long, and the rest sent then.
	liveBudget = time.Second
	// liveGiveUp is the downtime-limit set once the budget is spent.
	liveGiveUp = 60_000
	// liveHoles: a machine on its own memory file is copied live when at
	// most 1/liveHoles of the file is holes. Giving the holes back costs
	// the stopped guest about as much per page as comparing a page of
	// data costs the file copy.
	liveHoles = 4
)

// liveTracked says whether QEMU's dirty tracking of the running guest can
// be trusted with a live copy. Under KVM it is the kernel's. Under TCG,
// QEMU before 9.0 loses writes: its bitmap sync clears a page's dirty bit
// without making the translated code's TLB entry for the page catch the
// next write (fixed upstream by "physmem: Fix migration dirty bitmap
// coherency with TCG memory access"), so a page the guest writes after a
// pass can reach the copy stale. Fork children of QEMU 7.2 under TCG
// crashed on stale kernel pages (slab free lists, timer queues) about once
// in forty forks with the host busy (none in 130 with it quiet).
func (m *Machine) liveTracked() bool {
	m.qmpMu.Lock()
	v := m.qmp.version
	m.qmpMu.Unlock()
	if liveForced.Load() || soundDirtyTracking(m.accel, v) {
		return true
	}
	m.r.liveOff.Do(func() {
		m.r.logger().Warn("qemu: forks copy memory as files, not live: QEMU before 9.0 loses pages a guest under TCG writes during a live copy", "qemu", v.String(), "accel", m.accel)
	})
	return false
}

// soundDirtyTracking says whether QEMU v, running guests with accel,
// tracks every page they write during a migration (liveTracked).
func soundDirtyTracking(accel string, v qemuVersion) bool {
	return accel == AccelKVM || v.atLeast(9, 0)
}

// liveForced (tests) lets live copies run where liveTracked says QEMU's
// dirty tracking loses writes.
var liveForced atomic.Bool

// liveCopy copies the running machine's memory into file (a fresh prepared
// file, all holes) with a RAM-carrying migration, calls atStop once QEMU
// has stopped the guest (the disk is frozen there), and returns the device
// state, in the form a migration with x-ignore-shared gives (splitRAM), and
// the pages written. The guest is left stopped after a migration (QEMU's
// postmigrate state; cont runs it again). On an error before the guest
// stopped, or from atStop, the migration is cancelled and QEMU lets the
// guest run on.
func (m *Machine) liveCopy(ctx context.Context, file string, gaps [][2]int64, atStop func() error) (devices []byte, pages int64, err error) {
	out, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer out.Close()
	w := &pageWriter{f: out, size: m.spec.MemSize}
	// QEMU reads every page of guest RAM, and reading a hole of a file on
	// tmpfs through a mapping fills it. The pages of gaps (the holes of the
	// machine's memory file before the copy) go back to holes: for a
	// machine on its own file, those still zeros, while the guest is
	// stopped (punch); for one on a frozen file, all of them, afterwards
	// (punchFrozen).
	if m.private {
		defer func() { go m.punchFrozen(gaps) }()
	}
	mapped, err := os.OpenFile(m.memFile, os.O_WRONLY, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer mapped.Close()
	uri, got, stop, err := m.receiveMigration("live.sock", func(r io.Reader, out io.Writer) error {
		if err := splitRAM(r, out, w.put); err != nil {
			return err
		}
		return w.flush()
	})
	if err != nil {
		return nil, 0, err
	}
	defer stop()
	if err := m.setLive(ctx, true); err != nil {
		return nil, 0, err
	}
	defer func() {
		if rerr := m.setLive(context.WithoutCancel(ctx), false); err == nil {
			err = rerr
		}
	}()
	if _, err := m.qmp.execute(ctx, "migrate", map[string]any{"uri": uri}); err != nil {
		return nil, 0, fmt.Errorf("qemu: %s: copying memory: %w", m.id, err)
	}
	// A reader that fails closes its end, and the migration fails with it:
	// say why (a stream that just ends is the migration's failure).
	readerErr := func(err error) error {
		select {
		case r := <-got:
			if r.err != nil && !errors.Is(r.err, io.ErrUnexpectedEOF) {
				return r.err
			}
		case <-time.After(100 * time.Millisecond):
		}
		return err
	}
	if err := m.awaitSwitchover(ctx); err != nil {
		err = readerErr(err)
		stop()
		m.cancelMigration()
		return nil, 0, fmt.Errorf("qemu: %s: copying memory: %w", m.id, err)
	}
	if err := atStop(); err != nil {
		m.cancelMigration()
		return nil, 0, err
	}
	if _, err := m.qmp.execute(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}); err != nil {
		m.cancelMigration()
		return nil, 0, fmt.Errorf("qemu: %s: copying memory: %w", m.id, err)
	}
	if err := m.waitMigration(ctx); err != nil {
		err = readerErr(err)
		stop()
		m.cancelMigration()
		return nil, 0, fmt.Errorf("qemu: %s: copying memory: %w", m.id, err)
	}
	select {
	case r := <-got:
		if r.err != nil {
			return nil, 0, fmt.Errorf("qemu: %s: copying memory: %w", m.id, r.err)
		}
		if !m.private {
			if err := w.punch(mapped, gaps); err != nil {
				return nil, 0, fmt.Errorf("qemu: %s: %w", m.id, err)
			}
		}
		return r.b, w.pages, nil
	case <-ctx.Done():
		return nil, 0, ctx.Err()
	}
}

// setLive switches the machine's migration capabilities to a live copy's
// (on) or back to the device-state saves of every other snapshot (off).
func (m *Machine) setLive(ctx context.Context, on bool) error {
	if on {
		if _, err := m.qmp.execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": liveDowntime}); err != nil {
			return fmt.Errorf("qemu: %s: %w", m.id, err)
		}
	}
	if _, err := m.qmp.execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{
		{"capability": "x-ignore-shared", "state": !on},
		{"capability": "pause-before-switchover", "state": on},
	}}); err != nil {
		return fmt.Errorf("qemu: %s: %w", m.id, err)
	}
	return nil
}

// awaitSwitchover waits until QEMU has stopped the guest and waits to send
// the last pages (pre-switchover). Once liveBudget is spent it raises the
// downtime-limit, so that the next pass ends the copy.
func (m *Machine) awaitSwitchover(ctx context.Context) error {
	deadline := time.Now().Add(liveBudget)
	return m.awaitMigration(ctx, "pre-switchover", func() error {
		if deadline.IsZero() || time.Now().Before(deadline) {
			return nil
		}
		deadline = time.Time{}
		_, err := m.qmp.execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": liveGiveUp})
		return err
	})
}

// pageWriter writes the guest RAM pages of a live copy into a memory file
// that starts as holes, runs of consecutive pages in one write. A page of
// zeros is written only over a page written before.
type pageWriter struct {
	f     *os.File
	size  int64
	sent  []uint64 // pages written, a bit each
	data  []uint64 // pages whose last record held data, a bit each
	buf   []byte   // a run of pages, for the file at offset at
	at    int64
	pages int64
}

// liveFault, when set (tests), is asked before each page a live copy
// writes, with the pages written so far; an error fails the copy there.
var liveFault func(written int64) error

// pageRun is the most a pageWriter holds before it writes.
const pageRun = 256 << 10

// put takes the page at off: it returns where its data goes, or, for a
// page of zeros, nothing.
func (w *pageWriter) put(off int64, zero bool) ([]byte, error) {
	if off < 0 || off%migrationPage != 0 || off+migrationPage > w.size {
		return nil, fmt.Errorf("page at %#x outside a memory file of %d bytes", off, w.size)
	}
	if liveFault != nil {
		if err := liveFault(w.pages); err != nil {
			return nil, err
		}
	}
	p := off / migrationPage
	if w.sent == nil {
		w.sent = make([]uint64, (w.size/migrationPage+63)/64)
		w.data = make([]uint64, len(w.sent))
	}
	if zero {
		w.data[p/64] &^= 1 << (p % 64)
	} else {
		w.data[p/64] |= 1 << (p % 64)
	}
	if zero && w.sent[p/64]&(1<<(p%64)) == 0 {
		return nil, nil // a hole still
	}
	if len(w.buf) > 0 && (w.at+int64(len(w.buf)) != off || len(w.buf)+migrationPage > pageRun) {
		if err := w.flush(); err != nil {
			return nil, err
		}
	}
	if w.buf == nil {
		w.buf = make([]byte, 0, pageRun)
	}
	if len(w.buf) == 0 {
		w.at = off
	}
	w.buf = w.buf[:len(w.buf)+migrationPage]
	page := w.buf[len(w.buf)-migrationPage:]
	if zero {
		clear(page)
	}
	w.sent[p/64] |= 1 << (p % 64)
	w.pages++
	return page, nil
}

// flush writes the run held.
func (w *pageWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	if _, err := w.f.WriteAt(w.buf, w.at); err != nil {
		return fmt.Errorf("memory file: %w", err)
	}
	w.buf = w.buf[:0]
	return nil
}

// memoryHoles lists the runs of pages [first, end) of the memory file at
// path, of size bytes, that hold no data, and counts their pages.
func memoryHoles(path string, size int64) (gaps [][2]int64, pages int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer f.Close()
	gaps, err = holes(f, size)
	for _, g := range gaps {
		pages += g[1] - g[0]
	}
	return gaps, pages, err
}

// holes lists the runs of pages [first, end) of the memory file f, of size
// bytes, that hold no data.
func holes(f *os.File, size int64) ([][2]int64, error) {
	var gaps [][2]int64
	for off := int64(0); off < size; {
		start, err := seekHole(f, off)
		if err != nil {
			return nil, err
		}
		if start >= size {
			break
		}
		end, err := seekData(f, start)
		if err != nil {
			return nil, err
		}
		if end < 0 || end > size {
			end = size
		}
		if first, last := (start+migrationPage-1)/migrationPage, end/migrationPage; first < last {
			gaps = append(gaps, [2]int64{first, last})
		}
		off = end
	}
	return gaps, nil
}

// punch gives the pages of gaps (holes of the machine's memory file before
// the copy) whose last record was zeros back to holes in f: the guest is
// stopped, so they are zeros still. Pages it wrote meanwhile stay.
func (w *pageWriter) punch(f *os.File, gaps [][2]int64) error {
	for _, g := range gaps {
		for p := g[0]; p < g[1]; {
			if w.data != nil && w.data[p/64]&(1<<(p%64)) != 0 {
				p++
				continue
			}
			q := p + 1
			for q < g[1] && (w.data == nil || w.data[q/64]&(1<<(q%64)) == 0) {
				q++
			}
			if err := punchHole(f, p*migrationPage, (q-p)*migrationPage); err != nil {
				return err
			}
			p = q
		}
	}
	return nil
}

// punchFrozen gives the pages of gaps back to holes in the frozen file the
// machine maps copy-on-write, after a migration that read them (which
// fills the holes): nobody writes a frozen file, so they are zeros.
func (m *Machine) punchFrozen(gaps [][2]int64) {
	f, err := os.OpenFile(m.memFile, os.O_WRONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return // gone with its last machine
	}
	if err == nil {
		err = punchGaps(f, gaps)
		f.Close()
	}
	if err != nil {
		m.r.logger().Warn("qemu: a frozen memory file keeps pages of zeros", "file", m.memFile, "err", err)
	}
}

// punchGaps gives the pages of gaps back to holes in f.
func punchGaps(f *os.File, gaps [][2]int64) error {
	for _, g := range gaps {
		if err := punchHole(f, g[0]*migrationPage, (g[1]-g[0])*migrationPage); err != nil {
			return err
		}
	}
	return nil
}
