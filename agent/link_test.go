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

	"github.com/boxd-dev/boxd/internal/testutil"
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
	n, err := l.Write(make([]byte, linkSendWindow+1))
	if n != linkSendWindow || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write past the window = %d, %v; want %d, a deadline", n, err, linkSendWindow)
	}
	if err := l.canResume(uint64(linkSendWindow) + 1); err == nil {
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

// TestByteQueue checks the queue against a plain slice through pushes, peeks, reads and drops of sizes around
// its chunks' (one byte, a chunk less one, a chunk, a chunk and one, several chunks).
func TestByteQueue(t *testing.T) {
	sizes := []int{1, 7, queueChunk - 1, queueChunk, queueChunk + 1, 3*queueChunk + 5}
	rng := rand.New(rand.NewPCG(1, 2))
	var q byteQueue
	var want []byte
	next := byte(0)
	for step := range 2000 {
		size := sizes[rng.IntN(len(sizes))]
		switch op := rng.IntN(4); {
		case op == 0 || q.len() == 0:
			p := make([]byte, size)
			for i := range p {
				p[i], next = next, next+1
			}
			q.push(p)
			want = append(want, p...)
		case op == 1:
			from := rng.IntN(q.len())
			got := q.peek(from, size)
			if len(got) == 0 || len(got) > size || !bytes.Equal(got, want[from:from+len(got)]) {
				t.Fatalf("step %d: peek(%d, %d) of %d bytes gave %d bytes, not those at %d", step, from, size, len(want), len(got), from)
			}
			if end := from + q.off; len(got) < min(size, len(want)-from) && (end+len(got))%queueChunk != 0 {
				t.Fatalf("step %d: peek(%d, %d) stopped short (%d bytes) before its chunk's end", step, from, size, len(got))
			}
		case op == 2:
			p := make([]byte, size)
			n := q.read(p)
			if n != min(size, len(want)) || !bytes.Equal(p[:n], want[:n]) {
				t.Fatalf("step %d: read of %d from %d bytes gave %d, or other bytes", step, size, len(want), n)
			}
			want = want[n:]
		default:
			n := min(size, q.len())
			q.drop(n)
			want = want[n:]
		}
		if q.len() != len(want) {
			t.Fatalf("step %d: len %d, want %d", step, q.len(), len(want))
		}
		if held := len(q.chunks) * queueChunk; held > len(want)+2*queueChunk {
			t.Fatalf("step %d: %d chunks held for %d bytes", step, len(q.chunks), len(want))
		}
	}
	q.drop(q.len())
	if len(q.chunks) != 0 {
		t.Errorf("an emptied queue holds %d chunks", len(q.chunks))
	}
}

// BenchmarkLinkStream streams one way in 32 KiB writes, read in 32 KiB reads at the other end, over a unix socket
// pair alone and over a link on one: what the link's framing, copies and bookkeeping add to each byte.
func BenchmarkLinkStream(b *testing.B) {
	for _, overLink := range []bool{false, true} {
		name := "socket pair"
		if overLink {
			name = "link"
		}
		b.Run(name, func(b *testing.B) {
			ca, cb, err := testutil.SocketPair()
			if err != nil {
				b.Fatal(err)
			}
			var w io.WriteCloser = ca
			var r io.Reader = cb
			if overLink {
				la, lb := newLink("0123456789abcdef"), newLink("0123456789abcdef")
				go func() { _ = la.Run(ca, ca, 0) }()
				go func() { _ = lb.Run(cb, cb, 0) }()
				defer lb.Close()
				w, r = la, lb
			}
			defer w.Close()
			buf := make([]byte, 32<<10)
			total := int64(b.N) * int64(len(buf))
			read := make(chan error, 1)
			go func() {
				_, err := io.CopyN(io.Discard, r, total)
				read <- err
			}()
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := w.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-read; err != nil {
				b.Fatal(err)
			}
		})
	}
}
