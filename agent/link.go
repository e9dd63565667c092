package agent

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
)

// Link's bounds.
const (
	// linkWindow bounds what a receiver holds unread: a sender may send no further than its window past what
	// the receiver has read. It is the most any end, of this version or an older one, sends ahead.
	linkWindow = 4 << 20
	// linkSendWindow is the most bytes this end keeps unacknowledged: Write blocks beyond it. The peer
	// acknowledges what its SSH connection has read, so the window is also how much of one SSH channel's data
	// may wait ahead of the next message of another: an agent request queued behind an upload waits for the
	// guest to decrypt what is ahead of it. A guest under TCG reads about 10 MB/s; 128 KiB keeps it fed (an
	// upload measured no slower than with 4 MiB) and the wait short. Its receiver may be older, with a window of
	// linkWindow and acknowledgements every 64 KiB.
	linkSendWindow = 128 << 10
	// linkAckEvery is how many bytes read the receiver lets pass before it acknowledges them without data to
	// carry the acknowledgement; below linkSendWindow, so a sender with a full window always hears of progress.
	linkAckEvery = 32 << 10
	// linkCloseFlush is how long Close lets the link try to send what is left and its close frame.
	linkCloseFlush = time.Second
)

// Link is one end of a resumable byte stream between boxd and an agent: the layer between a channel and the SSH
// connection over it. Each end numbers the bytes it sends, keeps them until the other end says it has read them,
// and on a new channel (Run) both ends say how much they hold of the other's stream, so the sender replays from
// there: no byte is lost or repeated while channels come and go. Between channels, reads wait and writes fill
// the window. The host's end lives in boxd, the guest's in the agent, that is in guest memory: it outlives a
// pause, a snapshot, a restore into another QEMU and a hibernation.
//
// A Link is a net.Conn: its deadlines and Close are those of the stream, not of any channel.
type Link struct {
	id string

	// mu protects the fields below; cond is signalled on every change of them.
	mu   sync.Mutex
	cond sync.Cond

	out     byteQueue // bytes sent or to send and not yet acknowledged: stream positions outAck to outAck+out.len()
	outAck  uint64    // what the peer has read of our stream
	outSent uint64    // what the channel now carries of our stream
	in      byteQueue // bytes received and not yet read
	inRecv  uint64    // what we hold of the peer's stream (read or not)
	inRead  uint64    // what we have read of it
	inAcked uint64    // what we last told the peer we have read
	ackNow  bool      // a fresh channel: tell the peer at once

	ch    io.Closer // the channel, nil between channels
	chGen uint64    // counts channels, so a channel's goroutines know when they are replaced

	closing    bool  // Close was called: send what is left and a close frame, then end
	peerClosed bool  // the peer closed the link
	failed     error // the link can go on no more

	readDL, writeDL deadline
}

// newLink returns a link named id with nothing sent or received yet.
func newLink(id string) *Link {
	l := &Link{id: id}
	l.cond.L = &l.mu
	l.readDL.cond, l.writeDL.cond = &l.cond, &l.cond
	return l
}

// newLinkID returns a fresh random link id.
func newLinkID() (string, error) {
	a, err := newNonce()
	if err != nil {
		return "", err
	}
	b, err := newNonce()
	if err != nil {
		return "", err
	}
	return a + b, nil
}

// ErrLinkClosed is what a closed link's reads and writes return (net.ErrClosed).
var ErrLinkClosed = net.ErrClosed

// errChannelReplaced ends a channel's goroutines when another channel took its place.
var errChannelReplaced = errors.New("agent: link: another channel took over")

// received returns how much of the peer's stream the link holds, for a hello.
func (l *Link) received() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inRecv
}

// canResume says whether a peer that holds peerRecv bytes of our stream can go on: what it lacks is still kept.
func (l *Link) canResume(peerRecv uint64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.checkResume(peerRecv)
}

func (l *Link) checkResume(peerRecv uint64) error {
	switch {
	case l.failed != nil:
		return l.failed
	case l.closing:
		return fmt.Errorf("agent: link %s: closed by this end: %w", l.id, errdefs.ErrFailedPrecondition)
	case l.peerClosed:
		return fmt.Errorf("agent: link %s: closed by the peer: %w", l.id, errdefs.ErrFailedPrecondition)
	case peerRecv < l.outAck || peerRecv > l.outAck+uint64(l.out.len()):
		return fmt.Errorf("agent: link %s: the peer holds %d bytes, this end kept %d to %d: %w",
			l.id, peerRecv, l.outAck, l.outAck+uint64(l.out.len()), errdefs.ErrFailedPrecondition)
	}
	return nil
}

// Run carries the link over ch, whose reads come from r (ch itself, or a reader holding bytes already read from
// it), until ch breaks, another channel takes over or the link closes, and returns why. peerRecv is how much of
// this end's stream the peer holds, from the hellos: sending goes on from there. ch is closed on return.
func (l *Link) Run(ch io.WriteCloser, r io.Reader, peerRecv uint64) error {
	l.mu.Lock()
	if err := l.checkResume(peerRecv); err != nil {
		l.mu.Unlock()
		ch.Close()
		return err
	}
	if l.ch != nil {
		l.ch.Close()
	}
	l.chGen++
	gen := l.chGen
	l.ch, l.outSent, l.ackNow = ch, peerRecv, true
	l.cond.Broadcast()
	l.mu.Unlock()

	rerr, werr := make(chan error, 1), make(chan error, 1)
	go func() { rerr <- l.readFrames(gen, r) }()
	go func() { werr <- l.writeFrames(gen, ch) }()
	var err error
	select {
	case err = <-rerr:
		l.endChannel(gen, ch)
		if werr := <-werr; err == nil {
			err = werr
		}
	case err = <-werr:
		if !errors.Is(err, ErrLinkClosed) && !errors.Is(err, errChannelReplaced) {
			// The channel broke while sending: the peer may have gone after sending its last frames, a close
			// among them. They are read before the channel goes.
			t := time.AfterFunc(linkCloseFlush, func() { ch.Close() })
			if rerr := <-rerr; errors.Is(rerr, io.EOF) {
				err = rerr
			}
			t.Stop()
			l.endChannel(gen, ch)
			return err
		}
		l.endChannel(gen, ch)
		if rerr := <-rerr; err == nil {
			err = rerr
		}
	}
	return err
}

// endChannel ends channel gen, waking its goroutines, and closes ch.
func (l *Link) endChannel(gen uint64, ch io.Closer) {
	l.mu.Lock()
	if l.chGen == gen {
		l.ch = nil
		l.chGen++
	}
	l.cond.Broadcast()
	l.mu.Unlock()
	ch.Close()
}

// readFrames applies the frames of channel gen until it breaks or is replaced.
func (l *Link) readFrames(gen uint64, r io.Reader) error {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 64<<10)
	}
	buf := make([]byte, frameHeaderLen+maxFramePayload)
	for {
		f, err := readFrame(br, buf)
		if err != nil {
			return err
		}
		if err := l.apply(gen, f); err != nil {
			return err
		}
	}
}

// apply takes in one frame of channel gen.
func (l *Link) apply(gen uint64, f frame) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.cond.Broadcast()
	if l.chGen != gen {
		return errChannelReplaced
	}
	if f.ack < l.outAck || f.ack > l.outSent {
		return fmt.Errorf("%w: acknowledges %d, sent %d to %d", errBadFrame, f.ack, l.outAck, l.outSent)
	}
	if f.seq != l.inRecv {
		return fmt.Errorf("%w: at %d, expected %d", errBadFrame, f.seq, l.inRecv)
	}
	l.out.drop(int(f.ack - l.outAck))
	l.outAck = f.ack
	switch f.typ {
	case frameData:
		if l.in.len()+len(f.payload) > linkWindow {
			return fmt.Errorf("%w: past the window", errBadFrame)
		}
		l.in.push(f.payload)
		l.inRecv += uint64(len(f.payload))
	case frameClose:
		l.peerClosed = true
		return io.EOF
	}
	return nil
}

// writeFrames sends on channel gen what there is to send until it breaks or is replaced.
func (l *Link) writeFrames(gen uint64, w io.Writer) error {
	buf := make([]byte, 0, frameHeaderLen+maxFramePayload)
	for {
		var err error
		buf, err = l.nextFrame(gen, buf[:0])
		if err != nil {
			return err
		}
		if _, err := w.Write(buf); err != nil {
			return err
		}
		if buf[0] == frameClose {
			return ErrLinkClosed
		}
	}
}

// nextFrame waits for something to send on channel gen and appends its frame to buf.
func (l *Link) nextFrame(gen uint64, buf []byte) ([]byte, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if l.chGen != gen {
			return nil, errChannelReplaced
		}
		if l.peerClosed || l.failed != nil {
			return nil, ErrLinkClosed
		}
		end := l.outAck + uint64(l.out.len())
		f := frame{ack: l.inRead, seq: l.outSent}
		switch {
		case l.outSent < end:
			f.typ, f.payload = frameData, l.out.peek(int(l.outSent-l.outAck), maxFramePayload)
			l.outSent += uint64(len(f.payload))
		case l.closing:
			f.typ = frameClose
		case l.ackNow || l.inRead-l.inAcked >= linkAckEvery:
			f.typ = frameAck
		default:
			l.cond.Wait()
			continue
		}
		l.inAcked, l.ackNow = l.inRead, false
		return appendFrame(buf, f), nil
	}
}

// Read reads the peer's stream, waiting across channels. After the peer closed the link it returns what is left,
// then io.EOF.
func (l *Link) Read(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for l.in.len() == 0 {
		switch {
		case l.closing || l.failed != nil:
			return 0, ErrLinkClosed
		case l.peerClosed:
			return 0, io.EOF
		case l.readDL.passed():
			return 0, os.ErrDeadlineExceeded
		}
		l.cond.Wait()
	}
	n := l.in.read(p)
	l.inRead += uint64(n)
	if l.inRead-l.inAcked >= linkAckEvery {
		l.cond.Broadcast()
	}
	return n, nil
}

// Write adds p to the stream, waiting while the window is full, across channels.
func (l *Link) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	done := 0
	for done < len(p) {
		switch {
		case l.closing || l.peerClosed || l.failed != nil:
			return done, ErrLinkClosed
		case l.writeDL.passed():
			return done, os.ErrDeadlineExceeded
		case l.out.len() >= linkSendWindow:
			l.cond.Wait()
			continue
		}
		n := min(len(p)-done, linkSendWindow-l.out.len())
		l.out.push(p[done : done+n])
		done += n
		l.cond.Broadcast()
	}
	return done, nil
}

// Close closes the link: reads and writes end at once; what was written is sent over the channel the link has,
// if any, then a close frame, within linkCloseFlush. A closed link takes no further channel.
func (l *Link) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		return nil
	}
	l.closing = true
	l.cond.Broadcast()
	l.readDL.set(time.Time{})
	l.writeDL.set(time.Time{})
	time.AfterFunc(linkCloseFlush, func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.ch != nil {
			l.ch.Close()
		}
	})
	return nil
}

// fail ends the link for good with err, closing its channel.
func (l *Link) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.failed == nil {
		l.failed = err
	}
	if l.ch != nil {
		l.ch.Close()
	}
	l.cond.Broadcast()
}

// done says whether the link can take no further channel.
func (l *Link) done() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closing || l.peerClosed || l.failed != nil
}

// LocalAddr names the link.
func (l *Link) LocalAddr() net.Addr { return linkAddr(l.id) }

// RemoteAddr names the link.
func (l *Link) RemoteAddr() net.Addr { return linkAddr(l.id) }

// SetDeadline sets the deadline of reads and writes, which is the stream's, not a channel's.
func (l *Link) SetDeadline(t time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.readDL.set(t)
	l.writeDL.set(t)
	return nil
}

// SetReadDeadline sets the deadline of reads.
func (l *Link) SetReadDeadline(t time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.readDL.set(t)
	return nil
}

// SetWriteDeadline sets the deadline of writes.
func (l *Link) SetWriteDeadline(t time.Time) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.writeDL.set(t)
	return nil
}

// linkAddr names a link, for logs.
type linkAddr string

func (a linkAddr) Network() string { return "boxd-link" }
func (a linkAddr) String() string  { return string(a) }

// deadline is one direction's deadline of a Link, which wakes its waiters when it passes.
type deadline struct {
	cond  *sync.Cond
	at    time.Time
	timer *time.Timer
}

// set moves the deadline to t (zero: none). The caller holds cond's lock.
func (d *deadline) set(t time.Time) {
	d.at = t
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if !t.IsZero() {
		d.timer = time.AfterFunc(time.Until(t), func() {
			d.cond.L.Lock()
			defer d.cond.L.Unlock()
			d.cond.Broadcast()
		})
	}
	d.cond.Broadcast()
}

// passed says whether the deadline has passed. The caller holds cond's lock.
func (d *deadline) passed() bool { return !d.at.IsZero() && !time.Now().Before(d.at) }

// byteQueue is a first-in, first-out queue of bytes, held in chunks of queueChunk bytes that come from a pool
// and go back to it once read: a queue that fills and empties again and again, as a link's do under a steady
// stream, neither grows a slice nor moves what it holds, and an empty one holds no memory.
type byteQueue struct {
	chunks []*[]byte // the bytes are chunks[0][off:], then the whole of each later chunk; only the last is short
	off    int
	n      int // bytes held
}

// queueChunk is the size of a byteQueue's chunks: a frame's payload at most.
const queueChunk = maxFramePayload

var queueChunks = sync.Pool{New: func() any {
	b := make([]byte, 0, queueChunk)
	return &b
}}

func (q *byteQueue) len() int { return q.n }

// push appends a copy of p.
func (q *byteQueue) push(p []byte) {
	for len(p) > 0 {
		if len(q.chunks) == 0 || len(*q.chunks[len(q.chunks)-1]) == queueChunk {
			c := queueChunks.Get().(*[]byte)
			*c = (*c)[:0]
			q.chunks = append(q.chunks, c)
		}
		c := q.chunks[len(q.chunks)-1]
		k := copy((*c)[len(*c):queueChunk], p)
		*c = (*c)[:len(*c)+k]
		p = p[k:]
		q.n += k
	}
}

// peek returns up to n bytes from position from of the queue (0: its first byte) without copying them: fewer
// where a chunk ends first. The bytes stay valid until the queue drops them.
func (q *byteQueue) peek(from, n int) []byte {
	from += q.off
	c := q.chunks[from/queueChunk]
	from %= queueChunk
	return (*c)[from:min(from+n, len(*c))]
}

// read copies the queue's first bytes into p and drops them; it returns how many.
func (q *byteQueue) read(p []byte) int {
	done := 0
	for done < len(p) && q.n > 0 {
		k := copy(p[done:], q.peek(0, len(p)-done))
		q.drop(k)
		done += k
	}
	return done
}

// drop forgets the first n bytes, giving the chunks it emptied back to the pool.
func (q *byteQueue) drop(n int) {
	q.n -= n
	q.off += n
	for len(q.chunks) > 0 && (q.off >= queueChunk || q.n == 0) {
		queueChunks.Put(q.chunks[0])
		q.chunks[0] = nil
		q.chunks = q.chunks[1:]
		q.off = max(q.off-queueChunk, 0)
	}
	if len(q.chunks) == 0 {
		q.chunks, q.off = nil, 0
	}
}

// detach breaks the link's channel, if it has one, so that none carries it until the next Run, and returns how
// much of the peer's stream the link holds: what a hello says, with no old channel's frame coming after.
func (l *Link) detach() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ch != nil {
		l.ch.Close()
		l.ch = nil
	}
	l.chGen++
	l.cond.Broadcast()
	return l.inRecv
}
