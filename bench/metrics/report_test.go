package main

import (
	"math/rand/v2"
	"testing"
	"time"
)

// phasesOf are rounds phases of n samples each around mean, spread by
// ±spread in steps.
func phasesOf(rounds, n int, mean, spread time.Duration) [][]time.Duration {
	var ps [][]time.Duration
	for range rounds {
		var p []time.Duration
		for i := range n {
			p = append(p, mean-spread+time.Duration(i)*2*spread/time.Duration(max(n-1, 1)))
		}
		ps = append(ps, p)
	}
	return ps
}

// drifting are rounds phases of n samples each, round r's around
// mean×(1+r/2)×(1+pct/100), spread by ±1%: load that grows across the run.
func drifting(rounds, n int, mean time.Duration, pct float64) [][]time.Duration {
	var ps [][]time.Duration
	for r := range rounds {
		m := time.Duration(float64(mean) * (1 + float64(r)/2) * (1 + pct/100))
		ps = append(ps, phasesOf(1, n, m, m/100)[0])
	}
	return ps
}

func TestJudge(t *testing.T) {
	ms := time.Millisecond
	for _, c := range []struct {
		name   string
		a, b   [][]time.Duration
		rounds int
		want   string
	}{
		{"same", phasesOf(4, 10, 400*ms, 4*ms), phasesOf(4, 10, 400*ms, 4*ms), 4, "within"},
		{"5% slower", phasesOf(4, 10, 400*ms, 4*ms), phasesOf(4, 10, 420*ms, 4*ms), 4, "above"},
		{"noisy", phasesOf(4, 10, 400*ms, 80*ms), phasesOf(4, 10, 400*ms, 80*ms), 4, "cannot tell"},
		{"drift shared by both sides", drifting(6, 5, 400*ms, 0), drifting(6, 5, 400*ms, 0.5), 6, "within"},
		{"one round", phasesOf(1, 10, 400*ms, 4*ms), phasesOf(1, 10, 400*ms, 4*ms), 1, "cannot tell"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var cmp Comparison
			cmp.P50DiffLow, cmp.P50DiffHigh = interval(c.a, c.b, rand.New(rand.NewPCG(1, 2)))
			if cmp.P50DiffLow > cmp.P50DiffHigh {
				t.Fatalf("interval %.2f .. %.2f is upside down", cmp.P50DiffLow, cmp.P50DiffHigh)
			}
			if got, why := judge(cmp, c.rounds, 2); got != c.want {
				t.Errorf("interval %+.2f%% .. %+.2f%%: got %q (%s), want %q", cmp.P50DiffLow, cmp.P50DiffHigh, got, why, c.want)
			}
		})
	}
}
