package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// childFile is where a child of forkScript writes the time box fork
// returned in it.
const childFile = "/root/box-fork-returned"

// forkScript runs in dev through boxd exec. It forks dev with box fork,
// taking dev's clock just before (T0), as soon as box fork returns (T1)
// and once more right after (T2: what a date costs there); the parent
// prints them and box fork's answer ("T0 T1 T2 parent dev-1"); a child
// writes its T1 and T2 and its answer ("T1 T2 child 1 of 1 dev-1") to
// childFile, its output sent to a file first, as the exec session belongs
// to the parent.
const forkScript = `t0=$(date +%s%N)
out=$(box fork)
t1=$(date +%s%N)
t2=$(date +%s%N)
case $out in
child*)
	exec >/root/box-fork.log 2>&1
	echo "$t1 $t2 $out" >` + childFile + `.tmp && mv ` + childFile + `.tmp ` + childFile + ` ;;
parent*) echo "$t0 $t1 $t2 $out" ;;
*) echo "box fork printed: $out" >&2; exit 1 ;;
esac
`

// baseHost is what every row is compared with.
const baseHost = "`boxd fork dev kid` from the host: the CLI's wall time until it returns (the child runs and is unique)"

// hostSample is one fork from the host.
type hostSample struct {
	took              time.Duration // the CLI's wall time
	devBefore, devAft skew          // dev's clock against the host's, before and after
}

// inside is one fork from inside dev.
type inside struct {
	child             string        // its name, from the parent's answer
	parent            time.Duration // box fork until it returned in the parent, on dev's clock
	inChild           time.Duration // until it returned in the child: the child's clock after less dev's before
	exec              time.Duration // the boxd exec that ran forkScript, on the host
	parentDate        time.Duration // a date right after box fork returned, in the parent
	childDate         time.Duration // the same in the child
	devBefore, devAft skew          // dev's clock against the host's, before and after
	kidClock          skew          // the child's clock against the host's
}

// parentOnHost is parent on the host's clock: less what dev's clock lost
// against the host's meanwhile (it stands still while dev is paused for
// the fork's snapshot), and how far off that can be.
func (s inside) parentOnHost() (time.Duration, time.Duration) {
	return s.parent - (s.devAft.d - s.devBefore.d), s.devAft.plusMinus + s.devBefore.plusMinus
}

// inChildOnHost is inChild with both ends brought to the host's clock by
// the measured skews, and how far off that can be.
func (s inside) inChildOnHost() (time.Duration, time.Duration) {
	return s.inChild - s.kidClock.d + s.devBefore.d, s.kidClock.plusMinus + s.devBefore.plusMinus
}

// series are the samples of every rep, for the rows.
type series struct {
	host, parent, parentOnHost, child, childOnHost, exec []time.Duration
	devClock, kidClock, lostHost, lostInside             []time.Duration
	parentDate, childDate                                []time.Duration
	devPM, kidPM                                         []time.Duration
}

// measure times -reps forks of each kind, alternating which goes first,
// after -warm-ups untimed ones of each.
func (b *bench) measure(ctx context.Context) (Report, error) {
	began := time.Now()
	rep := Report{Host: host(), Setup: Setup{Memory: *memory, Reps: *reps, WarmUps: *warmUps}}
	for i := range *warmUps {
		if _, err := b.hostFork(ctx); err != nil {
			return rep, err
		}
		if _, err := b.insideFork(ctx); err != nil {
			return rep, err
		}
		benchkit.Progress("warm-up %d/%d: one fork of each kind, untimed", i+1, *warmUps)
	}

	var ss series
	for i := range *reps {
		first := "host"
		if i%2 == 1 {
			first = "inside"
		}
		var h hostSample
		var s inside
		var err error
		for _, which := range []string{first, other(first)} {
			if which == "host" {
				h, err = b.hostFork(ctx)
			} else {
				s, err = b.insideFork(ctx)
			}
			if err != nil {
				return rep, err
			}
		}
		p, ppm := s.parentOnHost()
		c, cpm := s.inChildOnHost()
		ss.host, ss.parent, ss.parentOnHost = append(ss.host, h.took), append(ss.parent, s.parent), append(ss.parentOnHost, p)
		ss.child, ss.childOnHost, ss.exec = append(ss.child, s.inChild), append(ss.childOnHost, c), append(ss.exec, s.exec)
		ss.devClock, ss.kidClock = append(ss.devClock, h.devBefore.d, s.devBefore.d), append(ss.kidClock, s.kidClock.d)
		ss.lostHost, ss.lostInside = append(ss.lostHost, h.devBefore.d-h.devAft.d), append(ss.lostInside, s.devBefore.d-s.devAft.d)
		ss.devPM = append(ss.devPM, h.devBefore.plusMinus, h.devAft.plusMinus, s.devBefore.plusMinus, s.devAft.plusMinus)
		ss.kidPM = append(ss.kidPM, s.kidClock.plusMinus)
		ss.parentDate, ss.childDate = append(ss.parentDate, s.parentDate), append(ss.childDate, s.childDate)
		rep.Reps = append(rep.Reps, Rep{
			First: first, Child: s.child,
			HostForkMs: ms(h.took), HostDevBefore: clockOf(h.devBefore), HostDevAfter: clockOf(h.devAft),
			ParentMs: ms(s.parent), ParentOnHostMs: ms(p), ParentOnHostPlusMinusMs: ms(ppm),
			ChildMs: ms(s.inChild), ChildOnHostMs: ms(c), ChildOnHostPlusMinusMs: ms(cpm), ExecMs: ms(s.exec),
			ParentDateMs: ms(s.parentDate), ChildDateMs: ms(s.childDate),
			DevBefore: clockOf(s.devBefore), DevAfter: clockOf(s.devAft), ChildClock: clockOf(s.kidClock),
		})
		benchkit.Progress("rep %d/%d (%s first): boxd fork %s (dev's clock lost %s); box fork returned in the parent after %s on dev's clock, "+
			"%s ± %s on the host's (dev's clock lost %s), in %s after %s across the clocks, %s ± %s on the host's; dev's clock %s off the host's before, %s's %s",
			i+1, *reps, first, benchkit.Ms(h.took), benchkit.Ms(h.devBefore.d-h.devAft.d), benchkit.Ms(s.parent), benchkit.Ms(p), benchkit.Ms(ppm),
			benchkit.Ms(s.devBefore.d-s.devAft.d), s.child, benchkit.Ms(s.inChild), benchkit.Ms(c), benchkit.Ms(cpm),
			benchkit.Ms(s.devBefore.d), s.child, benchkit.Ms(s.kidClock.d))
	}
	rep.addRows(ss)
	rep.Clocks = fmt.Sprintf(clocksNote, pings, "± "+benchkit.Ms(benchkit.Percentile(ss.devPM, 50)), "± "+benchkit.Ms(benchkit.Percentile(ss.kidPM, 50)))
	rep.Host.LoadAfter = benchkit.LoadAvg()
	rep.Seconds = time.Since(began).Seconds()
	return rep, nil
}

// addRows makes the table of ss: p50 and p90 of each figure of a fork
// from inside beside the host's fork, then the clocks.
func (r *Report) addRows(ss series) {
	for _, f := range []struct {
		what string
		d    []time.Duration
	}{
		{"box fork in dev, returns in the parent, dev's clock", ss.parent},
		{"box fork in dev, returns in the parent, host's clock", ss.parentOnHost},
		{"box fork in dev, returns in the child, two clocks", ss.child},
		{"box fork in dev, returns in the child, host's clock", ss.childOnHost},
	} {
		for _, p := range []int{50, 90} {
			r.add(benchkit.PctRow(fmt.Sprintf("%s: p%d", f.what, p), p, "ms", f.d, ss.host, baseHost))
		}
	}
	r.add(benchkit.PctRow("boxd exec dev -- sh -c SCRIPT, on the host: p50", 50, "ms", ss.exec, nil, ""))
	r.add(benchkit.PctRow("a date right after box fork returned, in the parent: p50", 50, "ms", ss.parentDate, nil, ""))
	r.add(benchkit.PctRow("a date right after box fork returned, in the child: p50", 50, "ms", ss.childDate, nil, ""))
	r.add(benchkit.PctRow("dev's clock less the host's, before a fork: p50", 50, "ms", ss.devClock, nil, ""))
	r.add(benchkit.PctRow("dev's clock lost in boxd fork: p50", 50, "ms", ss.lostHost, nil, ""))
	r.add(benchkit.PctRow("dev's clock lost in box fork: p50", 50, "ms", ss.lostInside, nil, ""))
	r.add(benchkit.PctRow("a child's clock less the host's: p50", 50, "ms", ss.kidClock, nil, ""))
}

func other(which string) string {
	if which == "host" {
		return "inside"
	}
	return "host"
}

// hostFork times `boxd fork dev kid` once the root's machines have
// settled, with dev's clock read before and after, checks that kid runs,
// and removes it (untimed).
func (b *bench) hostFork(ctx context.Context) (hostSample, error) {
	var h hostSample
	if err := b.boxd.Settle(ctx); err != nil {
		return h, err
	}
	var err error
	if h.devBefore, err = b.clockSkew(ctx, box); err != nil {
		return h, err
	}
	if h.took, _, err = b.boxd.CLI(ctx, "fork", box, kid); err != nil {
		return h, err
	}
	if h.devAft, err = b.clockSkew(ctx, box); err != nil {
		return h, err
	}
	st, err := b.boxd.State(ctx, kid)
	if err != nil {
		return h, err
	}
	if st != "running" {
		return h, fmt.Errorf("box %s is %s after boxd fork returned, want running", kid, st)
	}
	if _, _, err := b.boxd.CLI(ctx, "rm", kid); err != nil {
		return h, err
	}
	return h, nil
}

// insideFork runs forkScript in dev once the root's machines have
// settled, with dev's clock read before and after, reads the child's time
// in the child, reads the child's clock, and removes the child (untimed).
func (b *bench) insideFork(ctx context.Context) (inside, error) {
	var s inside
	if err := b.boxd.Settle(ctx); err != nil {
		return s, err
	}
	var err error
	if s.devBefore, err = b.clockSkew(ctx, box); err != nil {
		return s, err
	}
	took, out, err := b.boxd.CLI(ctx, "exec", "--no-stdin", box, "--", "sh", "-c", forkScript)
	if err != nil {
		return s, err
	}
	s.exec = took
	f := strings.Fields(string(out))
	if len(f) != 5 || f[3] != "parent" {
		return s, fmt.Errorf("the script in %s printed %q, want T0 T1 T2 parent CHILD", box, out)
	}
	t, err := nanos(f[:3])
	if err != nil {
		return s, fmt.Errorf("the script in %s printed %q: %w", box, out, err)
	}
	t0 := t[0]
	s.parent, s.parentDate, s.child = time.Duration(t[1]-t0), time.Duration(t[2]-t[1]), f[4]
	if s.devAft, err = b.clockSkew(ctx, box); err != nil {
		return s, err
	}

	line, err := b.childLine(ctx, s.child)
	if err != nil {
		return s, err
	}
	f = strings.Fields(line)
	if len(f) < 3 || f[2] != "child" || f[len(f)-1] != s.child {
		return s, fmt.Errorf("%s:%s is %q, want T1 T2 child 1 of 1 %s", s.child, childFile, line, s.child)
	}
	if t, err = nanos(f[:2]); err != nil {
		return s, fmt.Errorf("%s:%s is %q: %w", s.child, childFile, line, err)
	}
	s.inChild, s.childDate = time.Duration(t[0]-t0), time.Duration(t[1]-t[0])
	if s.kidClock, err = b.clockSkew(ctx, s.child); err != nil {
		return s, err
	}
	if _, _, err := b.boxd.CLI(ctx, "rm", s.child); err != nil {
		return s, err
	}
	return s, nil
}

// childLine reads childFile in the child with boxd exec, until the child
// has written it (at most a minute).
func (b *bench) childLine(ctx context.Context, child string) (string, error) {
	deadline := time.Now().Add(time.Minute)
	for {
		_, out, err := b.boxd.CLI(ctx, "exec", "--no-stdin", child, "--", "cat", childFile)
		if err == nil {
			return strings.TrimSpace(string(out)), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("the child's time, a minute after its parent's box fork returned: %w", err)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// nanos parses counts of nanoseconds.
func nanos(fields []string) ([]int64, error) {
	var t []int64
	for _, f := range fields {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return nil, err
		}
		t = append(t, n)
	}
	return t, nil
}
