package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// side is what the phases of one mode measured.
type side struct {
	devVCPU, devAgent []time.Duration // `boxd resume dev`: the log's total, the CLI's wall time
	wakeSSH, wakeVCPU []time.Duration // `ssh dev true` to the hibernated box, and the log's total for its resume
	runningSSH        []time.Duration // `ssh dev true` to the running box, a lazy restore's memory all in place
	soonSSH           []time.Duration // `ssh dev true` as soon as `boxd resume dev` returns
	busyAgent         []time.Duration // `boxd resume dev` of dev hibernated while an upload streamed into it
	bigVCPU, bigAgent []time.Duration
	litVCPU, litAgent []time.Duration
	devTook, wakeTook []time.Duration // lazy only: the done line's took
	bigTook, litTook  []time.Duration
	devMem, bigMem    []hostMem // after -idle
	litMem            []hostMem
	failed            []string                   // operations that failed, and went on from
	devPhases         map[string][]time.Duration // the phases of dev's resumes (restorePhases)
	mode              string
	eager             bool
}

// sides is both modes' figures, lazy first.
type sides [2]*side

// measure runs the rounds, each a lazy phase then an eager one, and
// returns the report.
func (b *bench) measure(ctx context.Context) (Report, error) {
	began := time.Now()
	rep := Report{Host: host(), Setup: Setup{
		Memory: *memory, FillMiB: *fillMiB, BigMemory: *bigMem, TouchBigMiB: *touchBig, TouchSmallMiB: *touchLow,
		Rounds: *rounds, Reps: *reps, Idle: idle.String(), WarmUps: *warmUps, Compact: *compact, FrameChunks: *frameChunks, UploadMiB: *uploadMiB,
		Daemon: "boxd daemon --debug --idle-hibernate 0 --warm-forks 0 --ssh-listen 127.0.0.1:PORT [--eager-restore]",
	}}
	s := sides{{mode: "lazy", devPhases: map[string][]time.Duration{}}, {mode: "eager", eager: true, devPhases: map[string][]time.Duration{}}}
	for round := 1; round <= *rounds; round++ {
		for _, sd := range s {
			if err := b.phase(ctx, sd, round, &rep); err != nil {
				return rep, fmt.Errorf("round %d, %s phase: %w", round, sd.mode, err)
			}
		}
	}
	rep.Rows = rows(s)
	for _, sd := range s {
		rep.Failures = append(rep.Failures, sd.failed...)
	}
	rep.Host.LoadAfter = benchkit.LoadAvg()
	rep.Seconds = time.Since(began).Seconds()
	return rep, nil
}

// phase starts a daemon of sd's mode, has it hibernate each box once
// (resumed untimed: the previous daemon hibernated them as it stopped),
// times -reps resumes and wakes of dev and resumes of big and little,
// then resumes all three, leaves them idle for -idle and reads their host
// memory, and stops the daemon, which hibernates them.
func (b *bench) phase(ctx context.Context, sd *side, round int, rep *Report) error {
	logStart, err := b.logSize()
	if err != nil {
		return err
	}
	if err := b.startDaemon(ctx, sd.eager); err != nil {
		return err
	}
	name := fmt.Sprintf("%s %d", sd.mode, round)
	for range *warmUps {
		for _, bx := range []string{dev, big, little} {
			r, err := b.resume(ctx, sd, bx, name+" warm-up", rep)
			if err != nil {
				return err
			}
			if !r.ok { // back in its snapshot; noted in the report
				continue
			}
			if err := b.hibernate(ctx, bx); err != nil {
				return err
			}
		}
	}
	benchkit.Progress("%s: each box resumed and hibernated %d times by this daemon (untimed)", name, *warmUps)
	if *compact {
		args := []string{"store", "compact"}
		if *frameChunks > 0 {
			args = append(args, "--frame-chunks", fmt.Sprint(*frameChunks))
		}
		took, _, err := b.boxd.CLI(ctx, args...)
		if err != nil {
			return fmt.Errorf("compacting the store: %w", err)
		}
		benchkit.Progress("%s: store compacted in %s", name, benchkit.Ms(took))
	}

	for i := range *reps {
		var soon time.Duration // ssh as soon as the resume returns: a lazy restore's memory still arrives
		r, err := b.resumeThen(ctx, sd, dev, name, rep, func() error {
			var err error
			if soon, err = b.sshTrue(ctx, dev); err != nil {
				return fmt.Errorf("ssh at once after the resume: %w", err)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if !r.ok {
			continue
		}
		sd.soonSSH = append(sd.soonSSH, soon)
		for p, d := range r.phases {
			sd.devPhases[p] = append(sd.devPhases[p], d)
		}
		sd.devVCPU, sd.devAgent = append(sd.devVCPU, r.total), append(sd.devAgent, r.e2e)
		if !sd.eager {
			sd.devTook = append(sd.devTook, r.took)
		}
		run, err := b.sshTrue(ctx, dev)
		if err != nil {
			return fmt.Errorf("ssh to the running box: %w", err)
		}
		sd.runningSSH = append(sd.runningSSH, run)
		if err := b.hibernate(ctx, dev); err != nil {
			return err
		}
		w, err := b.wake(ctx, sd, name, rep)
		if err != nil {
			return err
		}
		if !w.ok {
			continue
		}
		sd.wakeSSH, sd.wakeVCPU = append(sd.wakeSSH, w.e2e), append(sd.wakeVCPU, w.total)
		if !sd.eager {
			sd.wakeTook = append(sd.wakeTook, w.took)
		}
		if err := b.hibernate(ctx, dev); err != nil {
			return err
		}
		benchkit.Progress("%s: dev %d/%d: resume %s (vCPUs at %s%s), then ssh true at once %s; ssh true running %s; hibernated: ssh true %s (vCPUs at %s%s)",
			name, i+1, *reps, benchkit.Ms(r.e2e), benchkit.Ms(r.total), tookNote(r), benchkit.Ms(soon), benchkit.Ms(run), benchkit.Ms(w.e2e), benchkit.Ms(w.total), tookNote(w))
	}

	for i := range *reps {
		if *uploadMiB == 0 {
			break
		}
		r, err := b.busyResume(ctx, sd, name, rep)
		if err != nil {
			return err
		}
		if !r.ok {
			continue
		}
		sd.busyAgent = append(sd.busyAgent, r.e2e)
		if err := b.hibernate(ctx, dev); err != nil {
			return err
		}
		benchkit.Progress("%s: dev %d/%d, hibernated while %d MiB streamed into it: resume %s (vCPUs at %s%s); the upload arrived whole",
			name, i+1, *reps, *uploadMiB, benchkit.Ms(r.e2e), benchkit.Ms(r.total), tookNote(r))
	}

	for i := range *reps {
		for _, bx := range []string{big, little} {
			r, err := b.resume(ctx, sd, bx, name, rep)
			if err != nil {
				return err
			}
			if !r.ok {
				continue
			}
			if err := b.hibernate(ctx, bx); err != nil {
				return err
			}
			if bx == big {
				sd.bigVCPU, sd.bigAgent = append(sd.bigVCPU, r.total), append(sd.bigAgent, r.e2e)
				if !sd.eager {
					sd.bigTook = append(sd.bigTook, r.took)
				}
			} else {
				sd.litVCPU, sd.litAgent = append(sd.litVCPU, r.total), append(sd.litAgent, r.e2e)
				if !sd.eager {
					sd.litTook = append(sd.litTook, r.took)
				}
			}
			benchkit.Progress("%s: %s %d/%d: resume %s (vCPUs at %s%s)", name, bx, i+1, *reps, benchkit.Ms(r.e2e), benchkit.Ms(r.total), tookNote(r))
		}
	}

	// The three resumed, idle for -idle, then their host memory.
	for _, bx := range []string{dev, big, little} {
		if _, _, err := b.boxd.CLI(ctx, "resume", bx); err != nil {
			return err
		}
	}
	benchkit.Progress("%s: dev, big and little resumed; idle for %s", name, *idle)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(*idle):
	}
	for _, bx := range []string{dev, big, little} {
		h, err := b.measureHostMem(ctx, bx)
		if err != nil {
			return err
		}
		switch bx {
		case dev:
			sd.devMem = append(sd.devMem, h)
		case big:
			sd.bigMem = append(sd.bigMem, h)
		default:
			sd.litMem = append(sd.litMem, h)
		}
		benchkit.Progress("%s: %s after %s: QEMU PSS %s (shared memory %s), memory file %s allocated of %s: %s in all",
			name, bx, *idle, benchkit.Size(h.Pss), benchkit.Size(h.PssShmem), benchkit.Size(h.FileAlloc), benchkit.Size(h.FileSize), benchkit.Size(h.Total()))
		rep.Memory = append(rep.Memory, MemSample{Phase: name, Box: bx, hostMem: h, TotalBytes: h.Total()})
	}
	if err := b.stopDaemon(); err != nil {
		return err
	}
	warn, errs, lines, err := b.logTrouble(logStart)
	if err != nil {
		return err
	}
	for _, l := range lines {
		rep.LogTrouble = append(rep.LogTrouble, name+": "+l)
	}
	benchkit.Progress("%s: daemon stopped (boxes hibernated); its log has %d WARN and %d ERROR lines", name, warn, errs)
	return nil
}

// timedResume is one timed resume: the command's wall time, the log's
// total, and for a lazy restore the done line's took.
type timedResume struct {
	ok    bool // false: the resume failed, and the box was brought back to hibernated
	e2e   time.Duration
	total time.Duration
	took  time.Duration
	done  lazyDone
	// phases is the restore line's time for each of its phases.
	phases map[string]time.Duration
}

func tookNote(r timedResume) string {
	if r.took == 0 {
		return ""
	}
	return fmt.Sprintf(", memory in place at %s: %s demanded, %s prefetched, %s pushed, %s zeroed",
		benchkit.Ms(r.took), r.done.Demanded, r.done.Prefetched, r.done.Pushed, r.done.Zeroed)
}

// resume times `boxd resume name` and reads the daemon's log for the
// restore (waiting for a lazy one's memory to be in place).
func (b *bench) resume(ctx context.Context, sd *side, name, phase string, rep *Report) (timedResume, error) {
	return b.resumeThen(ctx, sd, name, phase, rep, nil)
}

// resumeThen is resume, with then run as soon as the command returns
// (before the wait for a lazy restore's memory), unless it failed.
func (b *bench) resumeThen(ctx context.Context, sd *side, name, phase string, rep *Report, then func() error) (timedResume, error) {
	return b.timedWake(ctx, sd, name, phase, "resume", rep, func() (time.Duration, error) {
		took, _, err := b.boxd.CLI(ctx, "resume", name)
		if err == nil && then != nil {
			err = then()
		}
		return took, err
	})
}

// wake times `ssh dev true` to the hibernated box dev, which resumes it.
func (b *bench) wake(ctx context.Context, sd *side, phase string, rep *Report) (timedResume, error) {
	return b.timedWake(ctx, sd, dev, phase, "ssh-wake", rep, func() (time.Duration, error) {
		return b.sshTrue(ctx, dev)
	})
}

// timedWake runs op, which resumes the hibernated box name, and reads the
// daemon's log for its restore. An op that fails is noted (sd.failed) and
// the box brought back to hibernated; the run goes on.
func (b *bench) timedWake(ctx context.Context, sd *side, name, phase, what string, rep *Report, op func() (time.Duration, error)) (timedResume, error) {
	off, err := b.logSize()
	if err != nil {
		return timedResume{}, err
	}
	e2e, err := op()
	if err != nil {
		sd.failed = append(sd.failed, fmt.Sprintf("%s: %s of %s: %v", phase, what, name, err))
		benchkit.Progress("%s: %s of %s failed: %v", phase, what, name, err)
		return timedResume{}, b.backToHibernated(ctx, name)
	}
	r, err := b.restoreOf(off, name)
	if err != nil {
		return timedResume{}, err
	}
	t := timedResume{ok: true, e2e: e2e, total: r.Total, phases: r.Phases}
	if !sd.eager {
		if t.done, err = b.awaitLazyDone(ctx, off, r); err != nil {
			return t, err
		}
		t.took = t.done.Took
	}
	rep.Samples = append(rep.Samples, Sample{Phase: phase, Box: name, Op: what, E2EMs: ms(e2e), VCPUMs: ms(r.Total), TookMs: ms(t.took), Restore: r.Line})
	return t, nil
}

// backToHibernated hibernates box name if it runs, after a failed resume.
func (b *bench) backToHibernated(ctx context.Context, name string) error {
	st, err := b.boxd.State(ctx, name)
	if err != nil {
		return err
	}
	switch st {
	case "hibernated":
		return nil
	case "running":
		err = b.hibernate(ctx, name)
		return err
	}
	return fmt.Errorf("box %s is %s after a failed resume", name, st)
}

// logTrouble counts the WARN and ERROR lines the daemon logged from offset
// on, and returns those lines.
func (b *bench) logTrouble(offset int64) (warn, errs int, lines []string, err error) {
	all, err := b.logSince(offset)
	if err != nil {
		return 0, 0, nil, err
	}
	for _, l := range all {
		switch {
		case strings.Contains(l, "level=WARN"):
			warn++
		case strings.Contains(l, "level=ERROR"):
			errs++
		default:
			continue
		}
		lines = append(lines, l)
	}
	return warn, errs, lines, nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// hibernate hibernates box name, then waits until the root's QEMU
// processes have stayed the same for half a second (at most 10 s): a
// hibernation readies a machine for the next resume, which a timed resume
// should find ready and not share the CPUs with.
func (b *bench) hibernate(ctx context.Context, name string) error {
	if _, _, err := b.boxd.CLI(ctx, "hibernate", name); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	_, last := b.boxd.QEMUs(ctx)
	since := time.Now()
	for time.Since(since) < 500*time.Millisecond && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if _, now := b.boxd.QEMUs(ctx); !slices.Equal(now, last) {
			last, since = now, time.Now()
		}
	}
	return nil
}
