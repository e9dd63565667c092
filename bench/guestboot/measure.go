package main

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/snapshotter"
)

// What each row is compared with.
const (
	baseBare     = "QEMU's bare boot of the same kernel, busybox initramfs, /init powers off at once: start to exit"
	baseBareKern = "the bare boot: \"" + markKernel + "\" on its console"
	baseBareInit = "the bare boot: its /init's line (\"" + markInit + "\") on its console"
	baseHost     = "exec of `true` on the host (os/exec)"
	baseFiles    = "what the box's files take: its guest memory file (tmpfs pages) plus its disk overlay"
	baseBoot     = "the cold boot of a box, Start to agent answering (the boot rows' boxd column)"
	baseQMP      = "a box's QEMU start, Start until QMP answers (the boot rows' boxd column)"
)

// measure runs every measurement in order and returns the report. Boxes
// boot one at a time, so no two measurements share the CPUs but a fork's
// two restores.
func (b *bench) measure(ctx context.Context) (Report, error) {
	began := time.Now()
	rep := Report{Host: host(b.r.Accel()), Guest: Guest{
		Kernel: strings.TrimPrefix(filepath.Base(b.kernel), "vmlinuz-"), Image: b.img.Name,
		MemMiB: b.mem >> 20, CPUs: *cpus, Reps: *reps, Execs: *execs,
	}}

	// The bare boot.
	var bareKernel, bareInit, bareExit []time.Duration
	for i := range *reps {
		f, err := bootBare(ctx, b.r.Accel(), b.kernel, b.bareInitrd, b.mem, *cpus, *timeout)
		if err != nil {
			return rep, err
		}
		benchkit.Progress("bare boot %d/%d: firmware done %s, /init's line %s, powered off %s", i+1, *reps, benchkit.Ms(f.kernel), benchkit.Ms(f.initLine), benchkit.Ms(f.exit))
		bareKernel, bareInit, bareExit = append(bareKernel, f.kernel), append(bareInit, f.initLine), append(bareExit, f.exit)
	}

	// Cold boots of boxes, each then snapshotted in full; the last one runs
	// the execs first.
	var qmp, kernel, agentLine, ready, snapTook []time.Duration
	var added, files []int64
	var inGuest, onHost []time.Duration
	for i := range *reps {
		name := fmt.Sprintf("%sbox-%d", snapPrefix, i+1)
		m, c, f, err := b.bootBox(ctx, name)
		if err != nil {
			return rep, err
		}
		benchkit.Progress("box %s: QMP %s, firmware done %s, agent's ready line %s, agent answering %s", name, benchkit.Ms(f.qmp), benchkit.Ms(f.kernel), benchkit.Ms(f.agentLine), benchkit.Ms(f.ready))
		qmp, ready = append(qmp, f.qmp), append(ready, f.ready)
		kernel, agentLine = appendSeen(kernel, f.kernel), appendSeen(agentLine, f.agentLine)

		if i == *reps-1 {
			if inGuest, err = execAgent(ctx, c, *execs); err != nil {
				return rep, fmt.Errorf("exec through the agent: %w", err)
			}
			if onHost, err = execHost(*execs); err != nil {
				return rep, fmt.Errorf("exec on the host: %w", err)
			}
			benchkit.Progress("exec of true: agent p50 %s, host p50 %s", benchkit.Ms(benchkit.Percentile(inGuest, 50)), benchkit.Ms(benchkit.Percentile(onHost, 50)))
		}

		_ = c.Close() // the box is idle, as one is when boxd hibernates it
		memBytes, err := allocated(m.MemoryFile())
		if err != nil {
			return rep, err
		}
		diskBytes, err := allocated(m.Disk())
		if err != nil {
			return rep, err
		}
		snap, err := b.snapshot(ctx, m.Snapshot, snapName(i), false, runner.SnapshotOptions{})
		if err != nil {
			return rep, err
		}
		benchkit.Progress("snapshot %s: %s, store +%s (%s); the box's files: memory %s, disk overlay %s",
			snapName(i), benchkit.Ms(snap.took), benchkit.Size(snap.added), mapsAdded(snap.snap), benchkit.Size(memBytes), benchkit.Size(diskBytes))
		snapTook, added, files = append(snapTook, snap.took), append(added, snap.added), append(files, memBytes+diskBytes)
		rep.Snapshots = append(rep.Snapshots, snapInfo(snap, false))
		if err := m.Stop(ctx); err != nil {
			return rep, err
		}
	}
	rep.add(benchkit.PctRow("boot: QEMU up, QMP answering", 50, "s", qmp, nil, ""))
	rep.add(benchkit.PctRow("boot: firmware hands over to the kernel", 50, "s", kernel, bareKernel, baseBareKern))
	rep.add(benchkit.PctRow("boot: agent's ready line (bare: /init's line)", 50, "s", agentLine, bareInit, baseBareInit))
	rep.add(benchkit.PctRow("boot: agent answering (bare: powered off)", 50, "s", ready, bareExit, baseBare))
	for _, st := range []struct {
		name string
		f    func([]time.Duration) time.Duration
	}{
		{"p50", func(d []time.Duration) time.Duration { return benchkit.Percentile(d, 50) }},
		{"p95", func(d []time.Duration) time.Duration { return benchkit.Percentile(d, 95) }},
		{"mean", mean},
	} {
		rep.add(statRow(fmt.Sprintf("exec `true`: %s of %d", st.name, *execs), st.f, inGuest, onHost, baseHost))
	}
	rep.add(benchkit.PctRow("snapshot (full): time", 50, "s", snapTook, nil, ""))
	rep.add(byteRow("snapshot (full), first box: bytes added", added[:1], files[:1], baseFiles))
	if len(added) > 1 {
		rep.add(byteRow("snapshot (full), later boxes: bytes added", added[1:], files[1:], baseFiles))
	}

	// Resumes, each from its box's snapshot; the last resumed box stays up
	// to be forked.
	var resumes []restored
	for i := range *reps {
		u, err := sameBox()
		if err != nil {
			return rep, err
		}
		disk := filepath.Join(b.work, fmt.Sprintf("resume-%d.qcow2", i+1))
		res, err := b.restore(ctx, snapName(i), disk, u, time.Now())
		if err != nil {
			return rep, err
		}
		if err := check(ctx, res.c); err != nil {
			return rep, fmt.Errorf("resumed box: %w", err)
		}
		benchkit.Progress("resume %d/%d: running %s, agent answering %s, fresh entropy taken %s", i+1, *reps, benchkit.Ms(res.running), benchkit.Ms(res.ready), benchkit.Ms(res.unique))
		resumes = append(resumes, res)
		_ = res.c.Close()
		if i < *reps-1 {
			if err := res.m.Stop(ctx); err != nil {
				return rep, err
			}
		}
	}
	rep.add(benchkit.PctRow("resume: running", 50, "s", pick(resumes, restored.runningAt), qmp, baseQMP))
	rep.add(benchkit.PctRow("resume: agent answering", 50, "s", pick(resumes, restored.readyAt), ready, baseBoot))

	// Forks, as boxd's box manager forks: Fork snapshots the box into a
	// frozen memory file of the snapshot's own while the box is stopped,
	// the box goes on, and two children restore from it at once, mapping
	// the file copy-on-write; the snapshot goes to the store meanwhile.
	// Without spares each restore starts QEMU; with two (StartSpares, before each
	// fork: QEMUs started ahead, paused, on the file Fork fills), none does.
	//
	// Of a booted box: its memory is a file of its own, which Fork copies.
	// Of a resumed box, restored copy-on-write from a frozen file as a
	// fork's boxes are: Fork adds the pages it wrote to a copy of that file
	// (made by StartSpares, else by SnapshotForFork), and QEMU's save of its device state
	// carries every page of guest RAM, which the runner drops. The same
	// box forks again in the next round.
	series := func(of string, spares int, parent *qemu.Machine, incremental bool) ([]forked, error) {
		var fs []forked
		for i := range *reps {
			if spares > 0 {
				if err := parent.StartSpares(ctx, spares); err != nil {
					return nil, err
				}
			}
			f, kids, err := b.forkRound(ctx, parent, fmt.Sprintf("%sfork-%s-%d-%d", snapPrefix, of, spares, i+1), incremental)
			if err != nil {
				return nil, err
			}
			benchkit.Progress("fork of a %s box, %d spares, %d/%d: %s", of, spares, i+1, *reps, f)
			fs = append(fs, f)
			rep.Snapshots = append(rep.Snapshots, snapInfo(f.snap, f.frozenFile))
			for _, k := range kids {
				if err := k.m.Stop(ctx); err != nil {
					return nil, err
				}
			}
		}
		return fs, nil
	}
	type run struct {
		of     string
		spares int
		fs     []forked
	}
	var runs []run
	for _, spares := range []int{0, 2} {
		m, c, _, err := b.bootBox(ctx, fmt.Sprintf("%sparent-%d", snapPrefix, spares))
		if err != nil {
			return rep, err
		}
		_ = c.Close()
		fs, err := series("booted", spares, m, false)
		if err != nil {
			return rep, err
		}
		if err := m.Stop(ctx); err != nil {
			return rep, err
		}
		runs = append(runs, run{"booted", spares, fs})
	}
	for _, spares := range []int{0, 2} {
		parent := resumes[len(resumes)-1].m
		if spares > 0 {
			u, err := sameBox()
			if err != nil {
				return rep, err
			}
			again, err := b.restore(ctx, snapName(*reps-1), filepath.Join(b.work, "resume-again.qcow2"), u, time.Now())
			if err != nil {
				return rep, err
			}
			_ = again.c.Close()
			parent = again.m
		}
		fs, err := series("resumed", spares, parent, true)
		if err != nil {
			return rep, err
		}
		if err := parent.Stop(ctx); err != nil {
			return rep, err
		}
		runs = append(runs, run{"resumed", spares, fs})
	}

	for _, r := range runs {
		var took []time.Duration
		var added, files []int64
		var both []restored
		for _, f := range r.fs {
			took, added, both = append(took, f.snap.took), append(added, f.snap.added), append(both, f.both)
			if f.files > 0 {
				files = append(files, f.files)
			}
		}
		what := fmt.Sprintf("fork of a %s box, %d spares: ", r.of, r.spares)
		snapIs := "full"
		if r.of == "resumed" {
			snapIs = "incremental"
		}
		rep.add(benchkit.PctRow(what+"the box stopped ("+snapIs+" snapshot, memory copied)", 50, "s", took, nil, ""))
		rep.add(byteRow(what+"bytes added by the snapshot", added, files, baseFiles))
		rep.add(benchkit.PctRow(what+"both forks running", 50, "s", pick(both, restored.runningAt), qmp, baseQMP))
		rep.add(benchkit.PctRow(what+"both forks' agents answering", 50, "s", pick(both, restored.readyAt), ready, baseBoot))
	}

	rep.Seconds = time.Since(began).Seconds()
	return rep, nil
}

// snapName is the full snapshot of the i-th box (from 0).
func snapName(i int) string { return fmt.Sprintf("%ssnap-%d", snapPrefix, i+1) }

// appendSeen appends d unless it is 0 (not seen).
func appendSeen(s []time.Duration, d time.Duration) []time.Duration {
	if d == 0 {
		return s
	}
	return append(s, d)
}

func (r restored) runningAt() time.Duration { return r.running }
func (r restored) readyAt() time.Duration   { return r.ready }

func pick(rs []restored, f func(restored) time.Duration) []time.Duration {
	out := make([]time.Duration, 0, len(rs))
	for _, r := range rs {
		out = append(out, f(r))
	}
	return out
}

// forked is one fork's figures: the snapshot, and the later of the two
// restores' times, from the snapshot's start.
type forked struct {
	snap       snapshotted
	frozenFile bool  // the freeze left a frozen memory file for the restores to map
	files      int64 // the parent's memory file and disk overlay (0 when its memory is a frozen file)
	both       restored
}

func (f forked) String() string {
	mem := "memory rebuilt from the store"
	if f.frozenFile {
		mem = "frozen memory file mapped"
	}
	return fmt.Sprintf("box stopped %s (store +%s: %s; %s), both forks running %s, both agents answering %s, both with their identity %s",
		benchkit.Ms(f.snap.took), benchkit.Size(f.snap.added), mapsAdded(f.snap.snap), mem, benchkit.Ms(f.both.running), benchkit.Ms(f.both.ready), benchkit.Ms(f.both.unique))
}

// forkRound forks parent as snapshot name (incremental or not), which
// goes on, and restores the snapshot twice at once, checks that both forks
// run commands, and returns the figures and the two forks.
func (b *bench) forkRound(ctx context.Context, parent *qemu.Machine, name string, incremental bool) (forked, [2]restored, error) {
	var f forked
	var kids [2]restored
	if !slices.Contains(b.r.FrozenFiles(), parent.MemoryFile()) {
		mem, err := allocated(parent.MemoryFile())
		if err != nil {
			return f, kids, err
		}
		disk, err := allocated(parent.Disk())
		if err != nil {
			return f, kids, err
		}
		f.files = mem + disk
	}
	frozen := len(b.r.FrozenFiles())
	start := time.Now()
	var err error
	if f.snap, err = b.snapshot(ctx, parent.SnapshotForFork, name, true, runner.SnapshotOptions{Incremental: incremental}); err != nil {
		return f, kids, err
	}
	f.frozenFile = len(b.r.FrozenFiles()) > frozen
	if kids, err = b.fork(ctx, name, start); err != nil {
		return f, kids, err
	}
	if err := b.stored(ctx, &f.snap); err != nil {
		return f, kids, err
	}
	for _, k := range kids {
		f.both.running, f.both.ready, f.both.unique = max(f.both.running, k.running), max(f.both.ready, k.ready), max(f.both.unique, k.unique)
		if err := check(ctx, k.c); err != nil {
			return f, kids, fmt.Errorf("forked box: %w", err)
		}
		_ = k.c.Close()
	}
	return f, kids, nil
}

// fork restores snapshot name twice at once, each fork with an identity
// of its own (hostname, machine-id, entropy, clock), as boxd's fork does.
func (b *bench) fork(ctx context.Context, name string, start time.Time) ([2]restored, error) {
	var kids [2]restored
	var errs [2]error
	var wg sync.WaitGroup
	for i := range kids {
		u, err := agent.NewUnique(fmt.Sprintf("%s-%d", name, i+1))
		if err != nil {
			return kids, err
		}
		disk := filepath.Join(b.work, fmt.Sprintf("%s-%d.qcow2", name, i+1))
		wg.Go(func() { kids[i], errs[i] = b.restore(ctx, name, disk, u, start) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return kids, err
		}
	}
	return kids, nil
}

// check runs `true` in the guest: the box does work, not only answer.
func check(ctx context.Context, c *agent.Client) error {
	code, err := c.Run(ctx, agent.Command{Args: []string{"true"}})
	if err == nil && code != 0 {
		err = fmt.Errorf("true exited %d", code)
	}
	return err
}

// mapsAdded lists what each map of a snapshot stored anew.
func mapsAdded(s snapshotter.Snapshot) string {
	var parts []string
	for _, m := range s.Maps {
		parts = append(parts, fmt.Sprintf("%s %s", m.Name, benchkit.Size(m.NewStored)))
	}
	return strings.Join(parts, ", ")
}

func snapInfo(s snapshotted, frozenFile bool) SnapshotInfo {
	info := SnapshotInfo{Name: s.snap.Name, Parent: s.snap.Parent, Seconds: s.took.Seconds(), PackBytesAdded: s.added, FrozenFile: frozenFile,
		NewStored: map[string]int64{}, NewChunks: map[string]int64{}}
	for _, m := range s.snap.Maps {
		info.NewStored[m.Name] = m.NewStored
		info.NewChunks[m.Name] = m.NewChunks
	}
	return info
}
