package main

import (
	"bufio"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"
)

// TestPing asks a fake guest whose clock is off the host's by a known
// amount, and answers after a delay, for its clock.
func TestPing(t *testing.T) {
	for _, off := range []time.Duration{0, 250 * time.Millisecond, -3 * time.Second} {
		t.Run(off.String(), func(t *testing.T) {
			inR, inW := io.Pipe()
			outR, outW := io.Pipe()
			go func() { // the guest: a line in, its clock out
				defer outW.Close()
				sc := bufio.NewScanner(inR)
				for sc.Scan() {
					time.Sleep(2 * time.Millisecond)
					fmt.Fprintln(outW, time.Now().Add(off).UnixNano())
				}
			}()
			s, err := ping(inW, bufio.NewReader(outR))
			inW.Close()
			if err != nil {
				t.Fatal(err)
			}
			if s.plusMinus <= 0 {
				t.Errorf("plus-minus %s, want above 0", s.plusMinus)
			}
			if diff := (s.d - off).Abs(); diff > s.plusMinus {
				t.Errorf("skew %s ± %s, want %s", s.d, s.plusMinus, off)
			}
		})
	}
}

// TestPingRefuses: an answer that is not a count of nanoseconds, and no
// answer, are errors.
func TestPingRefuses(t *testing.T) {
	for _, guest := range []string{"Thu Dec  3 10:00:00 UTC 2026\n", ""} {
		inR, inW := io.Pipe()
		go func() { _, _ = io.Copy(io.Discard, inR) }()
		if _, err := ping(inW, bufio.NewReader(strings.NewReader(guest))); err == nil {
			t.Errorf("guest answering %q: no error", guest)
		}
		inW.Close()
	}
}

// TestOnHost: the parent's wait less what dev's clock lost, and the
// child's end and dev's start each brought to the host's clock.
func TestOnHost(t *testing.T) {
	ms := time.Millisecond
	s := inside{
		parent:    800 * ms,  // on dev's clock
		inChild:   1300 * ms, // the child's clock at the end less dev's at the start
		devBefore: skew{d: -200 * ms, plusMinus: 10 * ms},
		devAft:    skew{d: -350 * ms, plusMinus: 20 * ms},
		kidClock:  skew{d: 5 * ms, plusMinus: 15 * ms},
	}
	if d, pm := s.parentOnHost(); d != 950*ms || pm != 30*ms {
		t.Errorf("parent on the host's clock: %s ± %s, want 950ms ± 30ms", d, pm)
	}
	// dev's start on the host's clock is 200 ms later than on dev's, the
	// child's end 5 ms earlier: 1300 - 200 - 5.
	if d, pm := s.inChildOnHost(); d != 1095*ms || pm != 25*ms {
		t.Errorf("child on the host's clock: %s ± %s, want 1095ms ± 25ms", d, pm)
	}
}
