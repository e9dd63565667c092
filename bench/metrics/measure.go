package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// phase is one daemon's life: the box's forks and resumes it served, and,
// with metrics, the scrapes meanwhile.
type phase struct {
	round   int
	metrics bool
	fork    []time.Duration // `boxd fork dev kid` until the CLI returned
	resume  []time.Duration // `boxd resume dev` of the hibernated box until the CLI returned
	scrapes []time.Duration // each GET /metrics, from the request to the body read
}

// name is the phase as the output calls it: A1, B1, A2, ...
func (p phase) name() string {
	if p.metrics {
		return fmt.Sprintf("B%d", p.round)
	}
	return fmt.Sprintf("A%d", p.round)
}

// measure runs the rounds, each phase A then phase B, and returns the
// report.
func (b *bench) measure(ctx context.Context) (Report, error) {
	began := time.Now()
	rep := Report{Host: host(), Setup: Setup{
		Memory: *memory, Runner: "qemu", Rounds: *rounds, Reps: *reps, WarmUps: *warmUps,
		ScrapeEvery: every.String(), BoundPct: *bound,
	}}
	var phases []phase
	for r := range *rounds {
		for _, metrics := range []bool{false, true} {
			p, err := b.phase(ctx, r+1, metrics)
			if err != nil {
				return rep, err
			}
			phases = append(phases, p)
		}
	}
	rep.Host.LoadAfter = benchkit.LoadAvg()
	rep.fill(phases)
	rep.Seconds = time.Since(began).Seconds()
	return rep, nil
}

// phase starts a daemon, with metrics scraped every -scrape-every when
// metrics is set, has the box run, times its forks and resumes, and stops
// the daemon (which hibernates the box). A scrape that fails fails the
// phase: the figures would not be those of a daemon serving metrics.
func (b *bench) phase(ctx context.Context, round int, metrics bool) (phase, error) {
	p := phase{round: round, metrics: metrics}
	url, err := b.startDaemon(ctx, metrics)
	if err != nil {
		return p, err
	}
	var s *scraper
	if metrics {
		s = scrape(url, *every)
	}
	err = b.timeOps(ctx, &p)
	var fails []string
	if s != nil {
		p.scrapes, fails = s.end()
	}
	if stopErr := b.stopDaemon(); err == nil {
		err = stopErr
	}
	if err == nil && len(fails) > 0 {
		err = fmt.Errorf("phase %s: %d of %d scrapes of %s failed: %s", p.name(), len(fails), len(p.scrapes), url, strings.Join(fails[:min(3, len(fails))], "; "))
	}
	if err != nil {
		return p, err
	}
	line := fmt.Sprintf("phase %s (%s): fork p50 %s, resume p50 %s", p.name(), describe(metrics),
		benchkit.Ms(benchkit.Percentile(p.fork, 50)), benchkit.Ms(benchkit.Percentile(p.resume, 50)))
	if metrics {
		line += fmt.Sprintf("; %d scrapes of %s, all 200 with boxd_boxes, p50 %s", len(p.scrapes), url, benchkit.Ms(benchkit.Percentile(p.scrapes, 50)))
	}
	benchkit.Progress("%s", line)
	return p, nil
}

// timeOps has the box run (untimed), then -warm-ups untimed and -reps
// timed rounds of a fork (its child removed, untimed) and a resume (after
// an untimed hibernate), each timed operation after the root's QEMUs have
// settled.
func (b *bench) timeOps(ctx context.Context, p *phase) error {
	if err := b.running(ctx); err != nil {
		return err
	}
	for i := range *warmUps + *reps {
		if err := b.settle(ctx); err != nil {
			return err
		}
		f, _, err := b.boxd.CLI(ctx, "fork", box, kid)
		if err != nil {
			return err
		}
		if _, _, err := b.boxd.CLI(ctx, "rm", kid); err != nil {
			return err
		}
		if _, _, err := b.boxd.CLI(ctx, "hibernate", box); err != nil {
			return err
		}
		if err := b.settle(ctx); err != nil {
			return err
		}
		r, _, err := b.boxd.CLI(ctx, "resume", box)
		if err != nil {
			return err
		}
		st, err := b.boxd.State(ctx, box)
		if err != nil {
			return err
		}
		if st != "running" {
			return fmt.Errorf("box %s is %s after boxd resume, want running", box, st)
		}
		what := "timed"
		if i < *warmUps {
			what = "untimed"
		} else {
			p.fork, p.resume = append(p.fork, f), append(p.resume, r)
		}
		benchkit.Progress("phase %s, %d/%d (%s): fork %s, resume %s", p.name(), i+1, *warmUps+*reps, what, benchkit.Ms(f), benchkit.Ms(r))
	}
	return nil
}

// describe is what a phase's daemon did about metrics.
func describe(metrics bool) string {
	if metrics {
		return "--metrics-listen, /metrics scraped every " + every.String()
	}
	return "no --metrics-listen"
}
