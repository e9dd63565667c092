package sshproxy

import (
	"math"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func tcpAddr(s string) net.Addr {
	a, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		panic(err)
	}
	return a
}

func TestThrottle(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	th := &Throttle{Base: time.Second, Max: 10 * time.Second, HalfLife: time.Minute, MaxSources: 3,
		Now: func() time.Time { return now }}
	a, b := tcpAddr("192.0.2.1:1000"), tcpAddr("192.0.2.2:1000")

	if d := th.Delay(a); d != 0 {
		t.Fatalf("before any failure: %v", d)
	}
	var delays []time.Duration
	for range 5 {
		th.Fail(a)
		delays = append(delays, th.Delay(a))
	}
	want := []time.Duration{time.Second, 3 * time.Second, 7 * time.Second, 10 * time.Second, 10 * time.Second}
	for i := range want {
		if delays[i] != want[i] {
			t.Errorf("after %d failures: %v, want %v", i+1, delays[i], want[i])
		}
	}
	if d := th.Delay(b); d != 0 {
		t.Errorf("another address: %v, want none", d)
	}
	if d := th.Delay(tcpAddr("192.0.2.1:2000")); d != 10*time.Second {
		t.Errorf("the same address from another port: %v", d)
	}

	// Failures halve every half-life: 5 failures are 1.25 after two.
	now = now.Add(2 * time.Minute)
	if d, want := th.Delay(a), time.Duration(float64(time.Second)*(math.Exp2(1.25)-1)); d.Round(time.Millisecond) != want.Round(time.Millisecond) {
		t.Errorf("two half-lives later: %v, want %v", d, want)
	}
	now = now.Add(time.Hour)
	if d := th.Delay(a); d != 0 {
		t.Errorf("an hour later: %v, want none to speak of", d.Round(time.Millisecond))
	}

	// One IPv6 /64 is one source.
	th.Fail(tcpAddr("[2001:db8:1:2::1]:22"))
	if d := th.Delay(tcpAddr("[2001:db8:1:2:ffff::9]:22")); d != time.Second {
		t.Errorf("the same /64: %v", d)
	}
	if d := th.Delay(tcpAddr("[2001:db8:1:3::1]:22")); d != 0 {
		t.Errorf("another /64: %v", d)
	}
}

// TestThrottleBounded checks that the table keeps at most MaxSources, and
// that a source that keeps failing outlives a crowd that failed once.
func TestThrottleBounded(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	th := &Throttle{MaxSources: 16, Now: func() time.Time { return now }}
	persistent := tcpAddr("198.51.100.1:1")
	for range 5 {
		th.Fail(persistent)
	}
	for i := range 1000 {
		th.Fail(tcpAddr("203.0.113." + strconv.Itoa(i%250) + ":" + strconv.Itoa(1000+i)))
		th.Fail(tcpAddr("[2001:db8::" + strconv.FormatInt(int64(i), 16) + ":0:0:0:1]:22"))
		now = now.Add(time.Millisecond)
	}
	if n := th.sourcesLen(); n > 16 {
		t.Errorf("%d sources remembered, want at most 16", n)
	}
	if d := th.Delay(persistent); d == 0 {
		t.Error("the persistent source was forgotten")
	}
}

// TestRefusalLoggedAndSlowed checks what operators see of refused logins
// (the box and the key, at Warn) and that failures from one address slow
// its next refusals while another address's login is not slowed. The
// person learns nothing more than TestRefusals allows.
func TestRefusalLoggedAndSlowed(t *testing.T) {
	const base = 150 * time.Millisecond
	e := newTestEnvWith(t, func(s *Server) {
		s.Throttle = &Throttle{Base: base, Max: 5 * time.Second, HalfLife: time.Hour}
	})
	owner, stranger := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)

	var took []time.Duration
	for range 4 {
		start := time.Now()
		got := e.ssh(t, nil, []testKey{stranger}, nil, "dev", "echo in")
		took = append(took, time.Since(start))
		if got.code != 255 || !strings.Contains(got.stderr, "Permission denied (publickey)") {
			t.Fatalf("got %+v, want a refusal", got)
		}
	}
	e.waitOutcomes(t, map[Outcome]int{Refused: 4}) // the last record is written by then
	refused := records(t, e.logs, "ssh login refused")
	if len(refused) != 4 {
		t.Fatalf("%d refusal records, want 4", len(refused))
	}
	fp := ssh.FingerprintSHA256(stranger.pub)
	for i, r := range refused {
		keys, _ := r["keys"].([]any)
		if r["level"] != "WARN" || r["box"] != "dev" || len(keys) != 1 || keys[0] != fp {
			t.Errorf("refusal record %d: %v, want level WARN, box dev and key %s", i, r, fp)
		}
		// The delays grow: 0, base, 3 base, 7 base.
		want := time.Duration((1<<i)-1) * base
		if d := time.Duration(r["delay"].(float64)); d != want.Round(time.Millisecond) {
			t.Errorf("refusal %d waited %v, want %v", i+1, d, want)
		}
	}
	// The client waited at least that long; the first did not.
	if min := 7 * base; took[3] < min || took[3] < took[0] {
		t.Errorf("the 4th refusal took %v, want at least %v (the 1st took %v)", took[3], min, took[0])
	}

	// From another address the first key offered is refused at once, and
	// the second gets in.
	got := e.ssh(t, nil, []testKey{stranger, owner}, []string{"-b", "127.0.0.2"}, "dev", "echo in")
	if got != (result{stdout: "in\n"}) {
		t.Fatalf("from 127.0.0.2: %+v", got)
	}
	var keyRefusals int
	for _, r := range records(t, e.logs, "ssh key refused: not authorized for the box") {
		if strings.HasPrefix(r["remote"].(string), "127.0.0.2:") {
			keyRefusals++
			if r["delay"].(float64) != 0 {
				t.Errorf("a refusal for 127.0.0.2 waited: %v", r)
			}
		}
	}
	if keyRefusals != 1 {
		t.Errorf("%d key refusals logged for 127.0.0.2, want 1", keyRefusals)
	}
	// The owner's own address gets in with the right key, however slow
	// its refusals are.
	if got := e.ssh(t, nil, []testKey{owner}, nil, "dev", "echo in"); got != (result{stdout: "in\n"}) {
		t.Errorf("the right key from 127.0.0.1: %+v", got)
	}
}

// TestRefusalPastTimeout checks that a login whose refusal waits past the
// handshake timeout still counts, and is logged, as refused.
func TestRefusalPastTimeout(t *testing.T) {
	e := newTestEnvWith(t, func(s *Server) {
		s.HandshakeTimeout = time.Second
		s.Throttle = &Throttle{Base: time.Minute, HalfLife: time.Hour}
	})
	owner, stranger := newTestKey(t), newTestKey(t)
	e.backend.addBox("dev", owner.pub)
	for range 2 {
		if got := e.ssh(t, nil, []testKey{stranger}, nil, "dev", "echo in"); got.code != 255 {
			t.Fatalf("got %+v, want a refusal", got)
		}
	}
	e.waitOutcomes(t, map[Outcome]int{Refused: 2})
	refused := records(t, e.logs, "ssh login refused")
	if len(refused) != 2 || refused[1]["recent_failures"] != 2.0 {
		t.Errorf("refusal records %v, want 2, the second with 2 recent failures", refused)
	}
}
