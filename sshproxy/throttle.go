package sshproxy

import (
	"math"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Throttle slows down refusals for a source that keeps failing to log in. Each refused login adds one to its
// source's failure count, which halves every HalfLife; a key refused for a source with a count of n waits
// Base*(2^n-1), at most Max, before the refusal is answered. A source that has not failed lately waits nothing,
// and a source's failures never slow another's logins. A source is an IPv4 address or an IPv6 /64 (one host's
// usual share). The zero Throttle has the defaults below; set its fields before the Server serves.
type Throttle struct {
	// Base is the delay after one recent failure; zero means 250ms.
	Base time.Duration
	// Max bounds the delay; zero means 8s.
	Max time.Duration
	// HalfLife is how fast failures are forgotten; zero means 1 minute.
	HalfLife time.Duration
	// MaxSources bounds the sources remembered; when full, the one with the fewest failures now is forgotten.
	// Zero means 4096.
	MaxSources int
	// Now is the clock; nil means time.Now.
	Now func() time.Time

	// mu protects sources.
	mu      sync.Mutex
	sources map[netip.Prefix]failures
}

// failures is a source's failure count as of at.
type failures struct {
	count float64
	at    time.Time
}

// forgotten is the count below which a source is dropped.
const forgotten = 1.0 / 64

func (t *Throttle) now() time.Time {
	if t.Now != nil {
		return t.Now()
	}
	return time.Now()
}

func (t *Throttle) halfLife() time.Duration { return orDefault(t.HalfLife, time.Minute) }

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// decayed is f's count at now.
func (t *Throttle) decayed(f failures, now time.Time) float64 {
	age := now.Sub(f.at)
	if age <= 0 {
		return f.count
	}
	return f.count * math.Exp2(-float64(age)/float64(t.halfLife()))
}

// source is the key of addr: its IPv4 address, or the /64 of its IPv6 address. Addresses that are not IP share
// one key.
func source(addr net.Addr) netip.Prefix {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}
	}
	ip := ta.AddrPort().Addr().Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return netip.Prefix{}
	}
	return p
}

// Delay is how long a refusal for addr waits now.
func (t *Throttle) Delay(addr net.Addr) time.Duration {
	t.mu.Lock()
	f, ok := t.sources[source(addr)]
	t.mu.Unlock()
	if !ok {
		return 0
	}
	n := t.decayed(f, t.now())
	base, limit := orDefault(t.Base, 250*time.Millisecond), orDefault(t.Max, 8*time.Second)
	d := float64(base) * (math.Exp2(n) - 1)
	if d >= float64(limit) {
		return limit
	}
	return time.Duration(d)
}

// Fail counts a refused login from addr and returns the source's failure count.
func (t *Throttle) Fail(addr net.Addr) float64 {
	key, now := source(addr), t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sources == nil {
		t.sources = map[netip.Prefix]failures{}
	}
	f, ok := t.sources[key]
	if !ok && len(t.sources) >= t.maxSources() {
		t.evictLocked(now)
	}
	n := 1.0
	if ok {
		n += t.decayed(f, now)
	}
	t.sources[key] = failures{count: n, at: now}
	return n
}

func (t *Throttle) maxSources() int {
	if t.MaxSources > 0 {
		return t.MaxSources
	}
	return 4096
}

// evictLocked makes room for one source: it drops every forgotten source, or else the one with the fewest
// failures now.
func (t *Throttle) evictLocked(now time.Time) {
	var weakest netip.Prefix
	least := math.Inf(1)
	dropped := false
	for k, f := range t.sources {
		n := t.decayed(f, now)
		if n < forgotten {
			delete(t.sources, k)
			dropped = true
			continue
		}
		if n < least {
			weakest, least = k, n
		}
	}
	if !dropped {
		delete(t.sources, weakest)
	}
}

// sourcesLen is how many sources are remembered.
func (t *Throttle) sourcesLen() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.sources)
}
