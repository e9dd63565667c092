package agent

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// breakingConn is a channel that breaks after limit bytes written: it writes what fits, then junk (a channel
// spoilt by a preamble) when junk is set, and closes.
type breakingConn struct {
	net.Conn
	mu      sync.Mutex
	limit   int
	written int
	junk    []byte
}

func (c *breakingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.limit < 0 || c.written+len(p) <= c.limit {
		n, err := c.Conn.Write(p)
		c.written += n
		return n, err
	}
	n, _ := c.Conn.Write(p[:c.limit-c.written])
	c.written += n
	if c.junk != nil {
		_, _ = c.Conn.Write(c.junk)
	}
	c.Close()
	return n, net.ErrClosed
}

// linkPair is two ends of a link and the channels that carry it, made anew whenever one breaks.
type linkPair struct {
	a, b *Link
	rng  *rand.Rand
	junk bool // spoil broken channels with junk
	// maxBreak bounds how far into a channel it breaks; 0 never breaks.
	maxBreak int
	wg       sync.WaitGroup
	stop     chan struct{}
}

// connect carries the pair over a fresh socket pair that breaks at a random point of either end's writes.
func (p *linkPair) connect(t *testing.T) {
	ca, cb := socketPair(t)
	bca := &breakingConn{Conn: ca, limit: -1}
	bcb := &breakingConn{Conn: cb, limit: -1}
	if p.maxBreak > 0 {
		side := []*breakingConn{bca, bcb}[p.rng.IntN(2)]
		side.limit = p.rng.IntN(p.maxBreak)
		if p.junk {
			side.junk = []byte("BOXD-SYNC 0123456789abcdef\n")
		}
	}
	recvA, recvB := p.a.detach(), p.b.detach()
	var both sync.WaitGroup
	both.Add(2)
	go func() { defer both.Done(); _ = p.a.Run(bca, bca, recvB) }()
	go func() { defer both.Done(); _ = p.b.Run(bcb, bcb, recvA) }()
	both.Wait()
}

// run reconnects the pair whenever its channel breaks, until stopped.
func (p *linkPair) run(t *testing.T) {
	p.stop = make(chan struct{})
	p.wg.Go(func() {
		for {
			select {
			case <-p.stop:
				return
			default:
			}
			if p.a.done() && p.b.done() {
				return
			}
			p.connect(t)
		}
	})
}

func (p *linkPair) close() {
	close(p.stop)
	p.a.Close()
	p.b.Close()
	p.wg.Wait()
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// TestLinkDelivers sends streams both ways over channels that break at random points, with and without junk
// after the break, and checks every byte arrives once and in order.
func TestLinkDelivers(t *testing.T) {
	tests := []struct {
		name     string
		size     int
		maxBreak int
		junk     bool
	}{
		{name: "unbroken", size: 1 << 20},
		{name: "small writes, breaks within frames", size: 200 << 10, maxBreak: 3000},
		{name: "over the window, breaks anywhere", size: 9 << 20, maxBreak: 2 << 20},
		{name: "spoilt channels", size: 1 << 20, maxBreak: 100 << 10, junk: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(i), 16))
			p := &linkPair{a: newLink("0123456789abcdef"), b: newLink("0123456789abcdef"), rng: rng,
				maxBreak: tt.maxBreak, junk: tt.junk}
			ab, ba := randomBytes(rng, tt.size), randomBytes(rng, tt.size/2)
			p.run(t) // p.rng is the channels' from here on
			var wg sync.WaitGroup
			send := func(l *Link, data []byte, chunk int, seed uint64) {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, 0))
				for len(data) > 0 {
					n := min(len(data), 1+rng.IntN(chunk))
					if _, err := l.Write(data[:n]); err != nil {
						t.Errorf("write: %v", err)
						return
					}
					data = data[n:]
				}
			}
			got := func(l *Link, n int) []byte {
				b := make([]byte, n)
				if _, err := io.ReadFull(l, b); err != nil {
					t.Errorf("read: %v", err)
				}
				return b
			}
			wg.Add(2)
			go send(p.a, ab, 70<<10, 1)
			go send(p.b, ba, 300, 2)
			var gotAB, gotBA []byte
			wg.Add(2)
			go func() { defer wg.Done(); gotAB = got(p.b, len(ab)) }()
			go func() { defer wg.Done(); gotBA = got(p.a, len(ba)) }()
			wg.Wait()
			if !bytes.Equal(gotAB, ab) {
				t.Errorf("a to b: %d bytes arrived differently (first difference at %d)", len(ab), firstDiff(gotAB, ab))
			}
			if !bytes.Equal(gotBA, ba) {
				t.Errorf("b to a: %d bytes arrived differently (first difference at %d)", len(ba), firstDiff(gotBA, ba))
			}
			p.close()
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestLinkWindow: without a channel, a writer fills the window and waits; the deadline shows where it stopped.
func TestLinkWindow(t *testing.T) {
	l := newLink("0123456789abcdef")
	defer l.Close()
	_ = l.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	n, err := l.Write(make([]byte, linkWindow+1))
	if n != linkWindow || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write past the window = %d, %v; want %d, a deadline", n, err, linkWindow)
	}
	if err := l.canResume(uint64(linkWindow) + 1); err == nil {
		t.Error("a peer holding bytes never sent may resume")
	}
	if err := l.canResume(10); err != nil {
		t.Errorf("a peer holding 10 kept bytes may not resume: %v", err)
	}
}

// TestLinkClose: the peer reads what was written before Close, then end of file; the closed end refuses more.
func TestLinkClose(t *testing.T) {
	p := &linkPair{a: newLink("0123456789abcdef"), b: newLink("0123456789abcdef"), rng: rand.New(rand.NewPCG(1, 2))}
	p.run(t)
	defer p.close()
	// A round trip: a channel carries the link.
	if _, err := p.b.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(p.a, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	if _, err := p.a.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	p.a.Close()
	got, err := io.ReadAll(p.b)
	if err != nil || string(got) != "last words" {
		t.Errorf("the peer read %q, %v; want the last words, then end of file", got, err)
	}
	if _, err := p.a.Write([]byte("more")); !errors.Is(err, ErrLinkClosed) {
		t.Errorf("Write after Close = %v", err)
	}
	if _, err := p.b.Write([]byte("more")); !errors.Is(err, ErrLinkClosed) {
		t.Errorf("Write to a closed peer = %v", err)
	}
}
