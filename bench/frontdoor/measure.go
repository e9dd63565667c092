package main

import (
	"context"
	"fmt"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// What rows are compared with.
const (
	baseSSHD    = "Debian's OpenSSH sshd on the host (private config and host key, key auth only, empty HOME), the same client running `true` as root; kex %s (its default)"
	baseSSHDKex = "the same sshd, the client held to the kex boxd's front door agrees to (-o KexAlgorithms=%s)"
	baseExec    = "`boxd exec BOX -- true` (the CLI through the daemon's API to the agent)"
	baseResume  = "`boxd resume BOX`, then `ssh BOX true` to the running box (sum of the two)"
	baseCreate  = "`boxd create` of a box of the same memory (cold boot until the agent answers)"
	baseSeed    = "`boxd create` of the seed box (cold boot, one run)"
	baseHelp    = "`boxd --help`: the boxd binary's start-up, no daemon asked"
	baseLs1     = "`boxd ls` with 1 box"
	baseLsJSON1 = "`boxd ls --json` with 1 box"
	baseAPI1    = "the API's GET /v1/boxes with 1 box"
	warmUps     = 2 // untimed round trips to each server first
)

// measure runs every measurement in order and returns the report.
func (b *bench) measure(ctx context.Context) (Report, error) {
	began := time.Now()
	rep := Report{Host: host(), Setup: Setup{
		Memory: *memory, ManyMemory: *manyMem, Reps: *reps, WakeReps: *wakeReps, ForkReps: *forkReps,
		LsReps: *lsReps, Boxes: *boxes, Batch: *batch, UploadMiB: *uploadMiB, UploadReps: *uploadReps,
	}}
	key := b.key + ".pub"

	// The measured box, then cold creates for the fork rows' baseline (the
	// first create of a root fetches the kernel, so it is not one of them).
	took, _, err := b.boxd.CLI(ctx, "create", door, "--ssh-key", key, "--memory", *memory)
	if err != nil {
		return rep, err
	}
	benchkit.Progress("created box %s (%s) in %s (untimed: a root's first create fetches the kernel)", door, *memory, secs(took))
	var creates []time.Duration
	for i := range *forkReps {
		name := fmt.Sprintf("cold-%d", i+1)
		took, _, err := b.boxd.CLI(ctx, "create", name, "--ssh-key", key, "--memory", *memory)
		if err != nil {
			return rep, err
		}
		creates = append(creates, took)
		if _, _, err := b.boxd.CLI(ctx, "rm", name); err != nil {
			return rep, err
		}
		benchkit.Progress("cold create %d/%d: %s", i+1, *forkReps, secs(took))
	}

	// ssh to the running box, to sshd, and boxd exec, interleaved; and to
	// sshd with the client held to the key exchange boxd's proxy agrees to,
	// when sshd's default is another.
	if rep.Kex.Boxd, err = b.kex(ctx, b.port, door); err != nil {
		return rep, err
	}
	if rep.Kex.SSHD, err = b.kex(ctx, b.sshdPort, "root"); err != nil {
		return rep, err
	}
	sameKex := rep.Kex.Boxd == rep.Kex.SSHD
	benchkit.Progress("key exchange: boxd's front door %s, sshd %s", rep.Kex.Boxd, rep.Kex.SSHD)
	var viaBoxd, viaSSHD, viaSSHDKex, viaExec []time.Duration
	for i := range warmUps + *reps {
		s, err := b.sshTrue(ctx, b.sshdPort, "root")
		if err != nil {
			return rep, fmt.Errorf("the baseline sshd: %w", err)
		}
		var k time.Duration
		if !sameKex {
			if k, err = b.sshTrue(ctx, b.sshdPort, "root", "-o", "KexAlgorithms="+rep.Kex.Boxd); err != nil {
				return rep, fmt.Errorf("the baseline sshd: %w", err)
			}
		}
		d, err := b.sshTrue(ctx, b.port, door)
		if err != nil {
			return rep, fmt.Errorf("boxd's front door: %w", err)
		}
		e, _, err := b.boxd.CLI(ctx, "exec", "--no-stdin", door, "--", "true")
		if err != nil {
			return rep, err
		}
		if i >= warmUps {
			viaSSHD, viaBoxd, viaExec = append(viaSSHD, s), append(viaBoxd, d), append(viaExec, e)
			if !sameKex {
				viaSSHDKex = append(viaSSHDKex, k)
			}
		}
	}
	benchkit.Progress("ssh true to running box %s: p50 %s, p95 %s; sshd p50 %s, p95 %s; boxd exec p50 %s (%d each)",
		door, benchkit.Ms(benchkit.Percentile(viaBoxd, 50)), benchkit.Ms(benchkit.Percentile(viaBoxd, 95)), benchkit.Ms(benchkit.Percentile(viaSSHD, 50)), benchkit.Ms(benchkit.Percentile(viaSSHD, 95)),
		benchkit.Ms(benchkit.Percentile(viaExec, 50)), *reps)
	for _, p := range []int{50, 95} {
		rep.add(benchkit.PctRow(fmt.Sprintf("ssh `true`, running box: p%d", p), p, "ms", viaBoxd, viaSSHD, fmt.Sprintf(baseSSHD, rep.Kex.SSHD)))
	}
	if !sameKex {
		for _, p := range []int{50, 95} {
			rep.add(benchkit.PctRow(fmt.Sprintf("ssh `true`, running box: p%d", p), p, "ms", viaBoxd, viaSSHDKex, fmt.Sprintf(baseSSHDKex, rep.Kex.Boxd)))
		}
	}
	for _, p := range []int{50, 95} {
		rep.add(benchkit.PctRow(fmt.Sprintf("ssh `true`, running box: p%d", p), p, "ms", viaBoxd, viaExec, baseExec))
	}

	if *uploadMiB > 0 {
		if err := b.measureUpload(ctx, &rep, viaExec); err != nil {
			return rep, err
		}
	}

	// ls with the one box.
	if err := b.expectBoxes(ctx, 1); err != nil {
		return rep, err
	}
	ls1, err := b.lsSeries(ctx, true)
	if err != nil {
		return rep, err
	}
	benchkit.Progress("ls with 1 box: boxd ls p50 %s, --json %s, API %s; boxd --help %s",
		benchkit.Ms(benchkit.Percentile(ls1.ls, 50)), benchkit.Ms(benchkit.Percentile(ls1.lsJSON, 50)), benchkit.Ms(benchkit.Percentile(ls1.api, 50)), benchkit.Ms(benchkit.Percentile(ls1.help, 50)))

	// ssh to the hibernated box, which wakes it, beside resume then ssh.
	var wake, resumeSSH, hibernates, resumes []time.Duration
	for i := range *wakeReps {
		h1, _, err := b.boxd.CLI(ctx, "hibernate", door)
		if err != nil {
			return rep, err
		}
		w, err := b.sshTrue(ctx, b.port, door)
		if err != nil {
			return rep, fmt.Errorf("ssh to hibernated box %s: %w", door, err)
		}
		if err := b.expectState(ctx, door, "running"); err != nil {
			return rep, err
		}
		h2, _, err := b.boxd.CLI(ctx, "hibernate", door)
		if err != nil {
			return rep, err
		}
		r, _, err := b.boxd.CLI(ctx, "resume", door)
		if err != nil {
			return rep, err
		}
		s, err := b.sshTrue(ctx, b.port, door)
		if err != nil {
			return rep, err
		}
		wake, resumeSSH = append(wake, w), append(resumeSSH, r+s)
		hibernates, resumes = append(hibernates, h1, h2), append(resumes, r)
		benchkit.Progress("wake %d/%d: ssh to hibernated box %s; hibernate %s, resume %s + ssh %s = %s",
			i+1, *wakeReps, benchkit.Ms(w), benchkit.Ms(h1), benchkit.Ms(r), benchkit.Ms(s), benchkit.Ms(r+s))
	}
	rep.add(benchkit.PctRow("ssh `true`, hibernated box (wakes it): p50", 50, "ms", wake, resumeSSH, baseResume))
	rep.add(benchkit.PctRow("ssh `true`, hibernated box (wakes it): p50", 50, "ms", wake, viaSSHD, fmt.Sprintf(baseSSHD, rep.Kex.SSHD)))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd hibernate, %s box: p50", *memory), 50, "ms", hibernates, nil, ""))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd resume, %s box: p50", *memory), 50, "ms", resumes, nil, ""))

	// Forks of the running box, the children removed after each.
	var forks, pairs, rmRunning []time.Duration
	for i := range *forkReps {
		f, _, err := b.boxd.CLI(ctx, "fork", door, "child")
		if err != nil {
			return rep, err
		}
		if _, err := b.sshTrue(ctx, b.port, "child"); err != nil {
			return rep, fmt.Errorf("the fork: %w", err)
		}
		r, _, err := b.boxd.CLI(ctx, "rm", "child")
		if err != nil {
			return rep, err
		}
		p, _, err := b.boxd.CLI(ctx, "fork", door, "pair", "--count", "2")
		if err != nil {
			return rep, err
		}
		for _, n := range []string{"pair-1", "pair-2"} {
			r, _, err := b.boxd.CLI(ctx, "rm", n)
			if err != nil {
				return rep, err
			}
			rmRunning = append(rmRunning, r)
		}
		forks, pairs, rmRunning = append(forks, f), append(pairs, p), append(rmRunning, r)
		benchkit.Progress("fork %d/%d of running box %s: one child %s, --count 2 %s", i+1, *forkReps, door, secs(f), secs(p))
	}
	rep.add(benchkit.PctRow("boxd fork SRC NEW (SRC running): p50", 50, "s", forks, creates, baseCreate))
	rep.add(benchkit.PctRow("boxd fork SRC NEW --count 2: p50", 50, "s", pairs, creates, baseCreate))
	rep.add(benchkit.PctRow("boxd rm of a running fork: p50", 50, "ms", rmRunning, nil, ""))

	// The many boxes, then ls again.
	many, err := b.makeMany(ctx)
	if err != nil {
		return rep, err
	}
	rep.Many = many.how
	if err := b.expectBoxes(ctx, *boxes); err != nil {
		return rep, err
	}
	lsN, err := b.lsSeries(ctx, false)
	if err != nil {
		return rep, err
	}
	benchkit.Progress("ls with %d boxes: boxd ls p50 %s, --json %s, API %s",
		*boxes, benchkit.Ms(benchkit.Percentile(lsN.ls, 50)), benchkit.Ms(benchkit.Percentile(lsN.lsJSON, 50)), benchkit.Ms(benchkit.Percentile(lsN.api, 50)))

	rep.add(benchkit.PctRow("boxd ls, 1 box: p50", 50, "ms", ls1.ls, ls1.help, baseHelp))
	rep.add(benchkit.PctRow("boxd ls --json, 1 box: p50", 50, "ms", ls1.lsJSON, ls1.help, baseHelp))
	rep.add(benchkit.PctRow("API GET /v1/boxes, 1 box: p50", 50, "ms", ls1.api, nil, ""))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd ls, %d boxes: p50", *boxes), 50, "ms", lsN.ls, ls1.ls, baseLs1))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd ls --json, %d boxes: p50", *boxes), 50, "ms", lsN.lsJSON, ls1.lsJSON, baseLsJSON1))
	rep.add(benchkit.PctRow(fmt.Sprintf("API GET /v1/boxes, %d boxes: p50", *boxes), 50, "ms", lsN.api, ls1.api, baseAPI1))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd fork --count %d of the hibernated %s seed: p50", *batch, *manyMem), 50, "s", many.forks, many.seedCreate, baseSeed))
	rep.add(benchkit.PctRow(fmt.Sprintf("boxd hibernate of a %s fork: p50", *manyMem), 50, "ms", many.hibernates, nil, ""))

	// Remove them all but the measured box, timing each rm.
	bs, err := b.boxd.Boxes(ctx)
	if err != nil {
		return rep, err
	}
	var rmHibernated []time.Duration
	for _, bx := range bs {
		if bx.Name == door {
			continue
		}
		r, _, err := b.boxd.CLI(ctx, "rm", bx.Name)
		if err != nil {
			return rep, err
		}
		if bx.State == "hibernated" {
			rmHibernated = append(rmHibernated, r)
		}
	}
	benchkit.Progress("removed %d boxes", len(bs)-1)
	rep.add(benchkit.PctRow("boxd rm of a hibernated box: p50", 50, "ms", rmHibernated, nil, ""))

	rep.Host.LoadAfter = benchkit.LoadAvg()
	rep.Seconds = time.Since(began).Seconds()
	return rep, nil
}

// lsTimes are the ls figures at one number of boxes.
type lsTimes struct{ ls, lsJSON, api, help []time.Duration }

// lsSeries times `boxd ls`, `boxd ls --json` and the API's list -ls-reps
// times each, interleaved, after one untimed round; with help, `boxd
// --help` too.
func (b *bench) lsSeries(ctx context.Context, help bool) (lsTimes, error) {
	var t lsTimes
	for i := range 1 + *lsReps {
		l, _, err := b.boxd.CLI(ctx, "ls")
		if err != nil {
			return t, err
		}
		j, _, err := b.boxd.CLI(ctx, "ls", "--json")
		if err != nil {
			return t, err
		}
		a, err := b.apiList(ctx)
		if err != nil {
			return t, err
		}
		var h time.Duration
		if help {
			if h, _, err = benchkit.Timed(ctx, b.boxd.Bin, "--help"); err != nil {
				return t, err
			}
		}
		if i == 0 {
			continue
		}
		t.ls, t.lsJSON, t.api = append(t.ls, l), append(t.lsJSON, j), append(t.api, a)
		if help {
			t.help = append(t.help, h)
		}
	}
	return t, nil
}

// many is how the boxes for the big ls were made.
type many struct {
	how        string
	seedCreate []time.Duration
	forks      []time.Duration // each fork --count of the seed
	hibernates []time.Duration // each fork's hibernate
}

// makeMany makes the boxes for the big ls cheaply: a small seed box,
// hibernated, forked -batch at a time; each batch is hibernated before
// the next, so that at most -batch forks (and the measured box) run.
func (b *bench) makeMany(ctx context.Context) (many, error) {
	var m many
	took, _, err := b.boxd.CLI(ctx, "create", seed, "--ssh-key", b.key+".pub", "--memory", *manyMem)
	if err != nil {
		return m, err
	}
	m.seedCreate = []time.Duration{took}
	if _, _, err := b.boxd.CLI(ctx, "hibernate", seed); err != nil {
		return m, err
	}
	benchkit.Progress("seed box %s (%s): created in %s and hibernated", seed, *manyMem, secs(took))
	want := *boxes - 2 // the measured box and the seed are two
	batches := 0
	for made := 0; made < want; {
		batches++
		n := min(*batch, want-made)
		prefix := fmt.Sprintf("m%03d", batches)
		took, _, err := b.boxd.CLI(ctx, "fork", seed, prefix, "--count", fmt.Sprint(n))
		if err != nil {
			return m, err
		}
		m.forks = append(m.forks, took)
		var hib time.Duration
		for j := 1; j <= n; j++ {
			h, _, err := b.boxd.CLI(ctx, "hibernate", fmt.Sprintf("%s-%d", prefix, j))
			if err != nil {
				return m, err
			}
			m.hibernates = append(m.hibernates, h)
			hib += h
		}
		made += n
		benchkit.Progress("boxes %d/%d: fork %s --count %d in %s, then each hibernated (%s in all)", made+2, *boxes, prefix, n, secs(took), secs(hib))
	}
	m.how = fmt.Sprintf("%d boxes: %s (%s, running) + %s (%s, made with boxd create, then hibernated) + %d forks of the hibernated %s, "+
		"made %d at a time with `boxd fork %s mNNN --count %d` (%d batches), each batch hibernated with `boxd hibernate`, one box at a time, "+
		"before the next; so at most %d boxes ran at once, and ls saw 1 running and %d hibernated",
		*boxes, door, *memory, seed, *manyMem, want, seed, *batch, seed, *batch, batches, 1+min(*batch, want), *boxes-1)
	return m, nil
}

// expectBoxes checks that the root has n boxes.
func (b *bench) expectBoxes(ctx context.Context, n int) error {
	bs, err := b.boxd.Boxes(ctx)
	if err != nil {
		return err
	}
	if len(bs) != n {
		return fmt.Errorf("boxd ls --json lists %d boxes, want %d", len(bs), n)
	}
	return nil
}

// expectState checks box name's state.
func (b *bench) expectState(ctx context.Context, name, state string) error {
	bs, err := b.boxd.Boxes(ctx)
	if err != nil {
		return err
	}
	for _, bx := range bs {
		if bx.Name == name {
			if bx.State != state {
				return fmt.Errorf("box %s is %s, want %s", name, bx.State, state)
			}
			return nil
		}
	}
	return fmt.Errorf("box %s is not listed", name)
}
