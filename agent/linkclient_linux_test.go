package agent

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// agentSocket serves a unix socket as QEMU's chardev does for one machine of a box: each connection is a channel
// to the agent, served with cfg (the agent's state, shared by every machine the box moves to).
type agentSocket struct {
	path string
	l    net.Listener
	mu   sync.Mutex
	open []net.Conn
	old  bool // an agent without the link
}

func newAgentSocket(t *testing.T, cfg *ServerConfig, old bool) *agentSocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &agentSocket{path: path, l: l, old: old}
	t.Cleanup(func() { cancel(); l.Close(); s.breakChannels() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.open = append(s.open, conn)
			s.mu.Unlock()
			if old {
				go serveOld(ctx, conn, cfg)
			} else {
				go func() { _ = Serve(ctx, conn, cfg) }()
			}
		}
	}()
	return s
}

// serveOld serves conn as an agent from before the link: a link hello is a client's SSH version line to it.
func serveOld(ctx context.Context, conn net.Conn, cfg *ServerConfig) {
	pc, hello, err := acceptPreamble(conn)
	if err != nil {
		conn.Close()
		return
	}
	if hello != nil {
		pc = &prefixConn{Conn: conn, r: io.MultiReader(strings.NewReader(string(hello)), pc)}
	}
	_ = serveSSH(ctx, pc, cfg)
}

// breakChannels breaks the channels open now, as a QEMU that ends does.
func (s *agentSocket) breakChannels() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.open {
		c.Close()
	}
	s.open = nil
}

// twoMachines starts two machines of one box (one agent state) and dials the first; the test's end closes the
// client.
func twoMachines(t *testing.T) ([]*agentSocket, *Client) {
	t.Helper()
	cfg := &ServerConfig{}
	machines := []*agentSocket{newAgentSocket(t, cfg, false), newAgentSocket(t, cfg, false)}
	c, err := Dial(testCtx(t), machines[0].path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return machines, c
}

// TestClientMove runs a session that streams a counter out and takes a stream in while its channel breaks, the
// client redials, and the box moves between machines: the counter arrives with no gap and no repeat, and the
// guest reads the stream exactly.
func TestClientMove(t *testing.T) {
	machines, c := twoMachines(t)
	sess, err := c.SSH().NewSession()
	if err != nil {
		t.Fatal(err)
	}
	stdin, _ := sess.StdinPipe()
	stdout, _ := sess.StdoutPipe()
	const lines = 1000000
	if err := sess.Start(fmt.Sprintf("seq 1 %d; sha256sum", lines)); err != nil {
		t.Fatal(err)
	}
	in := randomBytes(rand.New(rand.NewPCG(3, 4)), 6<<20)
	go func() {
		_, _ = stdin.Write(in)
		stdin.Close()
	}()

	on := 0
	r := bufio.NewReader(stdout)
	for i := 1; i <= lines; i++ {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("line %d: %v", i, err)
		}
		if line != strconv.Itoa(i)+"\n" {
			t.Fatalf("line %d reads %q", i, line)
		}
		switch {
		case i%100000 == 50000: // the channel breaks; the client dials the same machine again
			machines[on].breakChannels()
		case i%200000 == 0: // the box goes on in another machine
			machines[on].breakChannels()
			on = 1 - on
			if err := c.Move(testCtx(t), machines[on].path); err != nil {
				t.Fatalf("Move: %v", err)
			}
		}
	}
	sum, err := r.ReadString('\n')
	want := sha256.Sum256(in)
	if err != nil || !strings.HasPrefix(sum, hex.EncodeToString(want[:])) {
		t.Errorf("the guest read a stream with sum %q, %v; want %x", sum, err, want)
	}
	if err := sess.Wait(); err != nil {
		t.Errorf("session: %v", err)
	}
}

// TestClientMoveWhileRedialling moves the box right after its channel broke, again and again, at moments spread
// over the client's redial of the machine it was on: whether the move comes before, during or just after that
// redial, the link ends up on the machine moved to.
func TestClientMoveWhileRedialling(t *testing.T) {
	machines, c := twoMachines(t)
	broke := make(chan struct{}, 1)
	c.OnChannelBreak(func(string, error) { broke <- struct{}{} })
	on := 0
	for i := range 300 {
		machines[on].breakChannels()
		select {
		case <-broke: // the client saw the break and dials again now
		case <-testCtx(t).Done():
			t.Fatalf("move %d: the client did not see its channel break", i)
		}
		time.Sleep(time.Duration(i%60) * 20 * time.Microsecond)
		on = 1 - on
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := c.Move(ctx, machines[on].path)
		cancel()
		if err != nil {
			t.Fatalf("move %d: %v", i, err)
		}
	}
	if out, err := c.Output(testCtx(t), "echo", "ok"); err != nil || string(out) != "ok\n" {
		t.Fatalf("after the moves: %q, %v", out, err)
	}
}

// TestClientNewLink: a second client's new link replaces the first's (a fork's child, a restarted boxd): the
// first's connection ends, and it cannot move back in.
func TestClientNewLink(t *testing.T) {
	cfg := &ServerConfig{}
	m := newAgentSocket(t, cfg, false)
	first, err := Dial(testCtx(t), m.path)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	second, err := Dial(testCtx(t), m.path)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if out, err := second.Output(testCtx(t), "echo", "second"); err != nil || string(out) != "second\n" {
		t.Fatalf("the new link's client: %q, %v", out, err)
	}
	_ = first.Wait() // its link is gone on the guest: its SSH connection ends
	err = first.Move(testCtx(t), m.path)
	if !errdefs.IsNotFound(err) && !errors.Is(err, ErrLinkClosed) {
		t.Errorf("Move of a replaced link = %v, want not found", err)
	}
}

// TestDialOldAgent: an agent without the link gets a plain connection, and it cannot move.
func TestDialOldAgent(t *testing.T) {
	m := newAgentSocket(t, &ServerConfig{}, true)
	c, err := Dial(testCtx(t), m.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if out, err := c.Output(testCtx(t), "echo", "plain"); err != nil || string(out) != "plain\n" {
		t.Fatalf("Output = %q, %v", out, err)
	}
	if err := c.Move(testCtx(t), m.path); !errdefs.IsNotImplemented(err) {
		t.Errorf("Move without a link = %v, want not implemented", err)
	}
}

// TestClientChannelBreak: a channel that breaks unasked is reported, with its socket, before the client dials
// again; one that Move breaks is not.
func TestClientChannelBreak(t *testing.T) {
	machines, c := twoMachines(t)
	broke := make(chan string, 4)
	c.OnChannelBreak(func(socket string, err error) {
		if err == nil {
			t.Errorf("a break on %s reported without its error", socket)
		}
		broke <- socket
	})
	run := func(step string) {
		t.Helper()
		if out, err := c.Output(testCtx(t), "echo", "ok"); err != nil || strings.TrimSpace(string(out)) != "ok" {
			t.Fatalf("%s: echo: %q, %v", step, out, err)
		}
	}
	run("first")
	machines[0].breakChannels()
	select {
	case got := <-broke:
		if got != machines[0].path {
			t.Errorf("break reported on %s, want %s", got, machines[0].path)
		}
	case <-testCtx(t).Done():
		t.Fatal("a broken channel was not reported")
	}
	run("after the break")
	if err := c.Move(testCtx(t), machines[1].path); err != nil {
		t.Fatal(err)
	}
	run("after the move")
	select {
	case got := <-broke:
		t.Errorf("the channel Move broke was reported (%s)", got)
	default:
	}
}

// sharedPort is a guest's virtio-serial port behind QEMU chardev sockets, as across a restore: the guest's end is
// one connection that outlives the host's, and each host connection, to any of the sockets, takes the port over.
type sharedPort struct {
	guest, host net.Conn // the agent's end; the end the sockets' connections are spliced onto

	mu  sync.Mutex
	cur net.Conn // the host connection that has the port
}

func newSharedPort(t *testing.T) *sharedPort {
	g, h := socketPair(t)
	p := &sharedPort{guest: g, host: h}
	go func() { // the guest's output reaches whichever host connection has the port
		buf := make([]byte, 32<<10)
		for {
			n, err := h.Read(buf)
			p.mu.Lock()
			c := p.cur
			p.mu.Unlock()
			if n > 0 && c != nil {
				_, _ = c.Write(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}()
	return p
}

// socket returns the path of a new chardev socket onto the port.
func (p *sharedPort) socket(t *testing.T) string {
	path := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		l.Close()
		p.mu.Lock()
		if p.cur != nil {
			p.cur.Close()
		}
		p.mu.Unlock()
	})
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			if p.cur != nil {
				p.cur.Close()
			}
			p.cur = conn
			p.mu.Unlock()
			go func() { // the connection's bytes reach the guest while it has the port
				buf := make([]byte, 32<<10)
				for {
					n, err := conn.Read(buf)
					p.mu.Lock()
					if n > 0 && p.cur == conn {
						_, _ = p.host.Write(buf[:n])
					}
					p.mu.Unlock()
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return path
}

// cut ends the host connection that has the port, as a QEMU that stops, and leaves partial, the last bytes the
// guest got from it: what follows on the port comes from the next connection.
func (p *sharedPort) cut(t *testing.T, partial []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur != nil {
		p.cur.Close()
		p.cur = nil
	}
	if _, err := p.host.Write(partial); err != nil {
		t.Fatal(err)
	}
}

// TestMoveOnOnePort moves a link between two sockets onto one guest port, as a resume does (the new QEMU's
// socket, the guest's port as it was): the agent answers each new channel's first sync line on the port it has,
// without reopening it, and the session carries on.
func TestMoveOnOnePort(t *testing.T) {
	port := newSharedPort(t)
	var opens sync.Map
	next := func(ctx context.Context) (io.ReadWriteCloser, error) {
		if _, again := opens.LoadOrStore("port", true); again {
			<-ctx.Done() // this port opens once
			return nil, ctx.Err()
		}
		return port.guest, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = ServeSerial(ctx, next, &ServerConfig{}) }()
	sockets := []string{port.socket(t), port.socket(t)}
	c, err := Dial(testCtx(t), sockets[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 4 {
		if i > 0 {
			mctx, mcancel := context.WithTimeout(ctx, 10*time.Second)
			err := c.Move(mctx, sockets[i%2])
			mcancel()
			if err != nil {
				t.Fatalf("move %d: %v (a guest that closes its port to answer cannot open it again here)", i, err)
			}
		}
		if out, err := c.Output(testCtx(t), "echo", strconv.Itoa(i)); err != nil || string(out) != strconv.Itoa(i)+"\n" {
			t.Fatalf("after move %d: Output = %q, %v", i, out, err)
		}
	}
}

// TestChannelAfterCutFrame: a guest frozen with part of a frame read (a box hibernated, forked or moved while the
// host sent it data) gets the new channel's sync line where the rest of that frame was due. The agent answers
// that line on the port it has, wherever in the frame it comes, and the link carries on. Before, it took the sync
// lines for the frame's payload and answered none until its host gave up on the channel.
func TestChannelAfterCutFrame(t *testing.T) {
	header := func(n uint32) []byte { // a data frame's header, for a payload of n bytes
		h := appendFrame(nil, frame{typ: frameData, ack: 1, seq: 2, payload: []byte("abc")})[:frameHeaderLen]
		binary.BigEndian.PutUint32(h[17:21], n)
		return h
	}
	tests := []struct {
		name    string
		partial []byte
	}{
		{"in the payload", append(header(maxFramePayload), "abc"...)},
		{"in the header", header(maxFramePayload)[:10]},
		{"the line's start ends the frame", append(header(3+4), "abc"...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			port := newSharedPort(t)
			var opens sync.Map
			next := func(ctx context.Context) (io.ReadWriteCloser, error) {
				if _, again := opens.LoadOrStore("port", true); again {
					<-ctx.Done() // this port opens once, as across a restore
					return nil, ctx.Err()
				}
				return port.guest, nil
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() { _ = ServeSerial(ctx, next, &ServerConfig{}) }()
			socket := port.socket(t)
			c, err := Dial(testCtx(t), socket)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if out, err := c.Output(testCtx(t), "echo", "before"); err != nil || string(out) != "before\n" {
				t.Fatalf("before the cut: Output = %q, %v", out, err)
			}
			port.cut(t, tt.partial) // the client dials again on its own
			octx, ocancel := context.WithTimeout(ctx, 10*time.Second)
			defer ocancel()
			if out, err := c.Output(octx, "echo", "after"); err != nil || string(out) != "after\n" {
				t.Fatalf("after the cut: Output = %q, %v (the agent did not answer the new channel)", out, err)
			}
		})
	}
}

// TestRunUnanswered: Run returns its context's error once the context ends, though the guest has answered nothing
// yet (a guest frozen, or a link between channels), and the link carries on once the guest answers again.
func TestRunUnanswered(t *testing.T) {
	port := newSharedPort(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		_ = ServeSerial(ctx, func(context.Context) (io.ReadWriteCloser, error) { return port.guest, nil }, &ServerConfig{})
	}()
	c, err := Dial(testCtx(t), port.socket(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if out, err := c.Output(testCtx(t), "echo", "before"); err != nil || string(out) != "before\n" {
		t.Fatalf("Output = %q, %v", out, err)
	}
	port.mu.Lock() // nothing reaches the guest, nor comes back from it
	rctx, rcancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer rcancel()
	ran := make(chan error, 1)
	go func() {
		_, err := c.Run(rctx, Command{Args: []string{"true"}})
		ran <- err
	}()
	select {
	case err := <-ran:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Run = %v, want its context's deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("Run did not return after its context ended")
	}
	port.mu.Unlock()
	if out, err := c.Output(testCtx(t), "echo", "after"); err != nil || string(out) != "after\n" {
		t.Fatalf("after the guest answered again: Output = %q, %v", out, err)
	}
}

// TestClientOutlivesHandshake: the deadline of NewClient's context bounds the handshake alone. It was left on the
// connection under the link, whose first channel then broke at it (with a box's agent, 5 s after every Dial).
func TestClientOutlivesHandshake(t *testing.T) {
	cc, sc := socketPair(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = Serve(ctx, sc, &ServerConfig{}) }()
	hctx, hcancel := context.WithTimeout(ctx, 2*time.Second)
	defer hcancel()
	c, err := NewClient(hctx, cc)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline, _ := hctx.Deadline()
	time.Sleep(time.Until(deadline) + 300*time.Millisecond)
	if out, err := c.Output(testCtx(t), "echo", "later"); err != nil || string(out) != "later\n" {
		t.Fatalf("after the handshake's deadline: Output = %q, %v", out, err)
	}
}
