package agent

import (
	"bytes"
	"errors"
	"net"
	"strconv"
	"sync"

	"golang.org/x/crypto/ssh"
)

// maxRemoteForwards bounds the listeners one connection holds.
const maxRemoteForwards = 256

// remoteForwards are the listeners of one connection's RequestTCPIPForward requests. They close with the
// connection: a guest restored into a new QEMU, or one whose host went away, keeps none.
type remoteForwards struct {
	conn ssh.Conn
	logf func(string, ...any)

	// mu protects the fields below.
	mu     sync.Mutex
	closed bool
	byKey  map[forwardKey]*remoteForward
}

// forwardKey names a forward as the host does: the address as requested and the port listened on.
type forwardKey struct {
	addr string
	port uint32
}

type remoteForward struct {
	key       forwardKey
	tag       []byte
	listeners []net.Listener
}

func newRemoteForwards(conn ssh.Conn, logf func(string, ...any)) *remoteForwards {
	return &remoteForwards{conn: conn, logf: logf, byKey: map[forwardKey]*remoteForward{}}
}

// forwardHosts are the hosts a forward for addr listens on, the first required, the others (IPv6 loopback, which
// a guest may lack) where they can be had.
func forwardHosts(addr string) []string {
	switch addr {
	case "localhost":
		return []string{"127.0.0.1", "::1"}
	case "", "*":
		return []string{""}
	default:
		return []string{addr}
	}
}

// add serves a RequestTCPIPForward: it listens and says whether it does, with the reply's payload.
func (f *remoteForwards) add(payload []byte) (bool, []byte) {
	var r ForwardRequest
	if ssh.Unmarshal(payload, &r) != nil || r.Port > 65535 || len(r.Tag) > maxTag {
		return false, nil
	}
	f.mu.Lock()
	full := f.closed || len(f.byKey) >= maxRemoteForwards
	f.mu.Unlock()
	if full {
		return false, nil
	}

	fw := &remoteForward{tag: bytes.Clone(r.Tag)}
	port := int(r.Port)
	for i, host := range forwardHosts(r.Addr) {
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			if i == 0 {
				f.logf("tcpip-forward %s: %v", net.JoinHostPort(r.Addr, strconv.Itoa(port)), err)
				return false, nil
			}
			continue
		}
		if i == 0 {
			port = l.Addr().(*net.TCPAddr).Port
		}
		fw.listeners = append(fw.listeners, l)
	}
	fw.key = forwardKey{r.Addr, uint32(port)}

	f.mu.Lock()
	if _, taken := f.byKey[fw.key]; taken || f.closed {
		f.mu.Unlock()
		fw.close()
		return false, nil
	}
	f.byKey[fw.key] = fw
	f.mu.Unlock()
	for _, l := range fw.listeners {
		go f.accept(fw, l)
	}
	if r.Port == 0 {
		return true, ssh.Marshal(ForwardReply{Port: uint32(port)})
	}
	return true, nil
}

// cancel serves a RequestCancelTCPIPForward; only the tag that made a forward ends it.
func (f *remoteForwards) cancel(payload []byte) bool {
	var r ForwardRequest
	if ssh.Unmarshal(payload, &r) != nil {
		return false
	}
	key := forwardKey{r.Addr, r.Port}
	f.mu.Lock()
	fw, held := f.byKey[key]
	ok := held && bytes.Equal(fw.tag, r.Tag)
	if ok {
		delete(f.byKey, key)
	}
	f.mu.Unlock()
	switch {
	case ok:
		fw.close()
	case held:
		f.logf("cancel-tcpip-forward %s: refused: another connection's forward", key)
	default:
		f.logf("cancel-tcpip-forward %s: refused: no such forward", key)
	}
	return ok
}

// closeAll closes every listener; later requests are refused.
func (f *remoteForwards) closeAll() {
	f.mu.Lock()
	f.closed = true
	all := f.byKey
	f.byKey = map[forwardKey]*remoteForward{}
	f.mu.Unlock()
	for _, fw := range all {
		fw.close()
	}
}

func (fw *remoteForward) close() {
	for _, l := range fw.listeners {
		l.Close()
	}
}

// accept opens a ChannelForwardedTCPIP for each connection to l until l closes.
func (f *remoteForwards) accept(fw *remoteForward, l net.Listener) {
	for {
		conn, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				f.logf("tcpip-forward %s: %v", l.Addr(), err)
			}
			return
		}
		go f.open(fw, conn)
	}
}

func (f *remoteForwards) open(fw *remoteForward, conn net.Conn) {
	msg := ForwardedTCPIP{Addr: fw.key.addr, Port: fw.key.port, Tag: fw.tag}
	if a, ok := conn.RemoteAddr().(*net.TCPAddr); ok {
		msg.OrigAddr, msg.OrigPort = a.IP.String(), uint32(a.Port)
	}
	ch, reqs, err := f.conn.OpenChannel(ChannelForwardedTCPIP, ssh.Marshal(msg))
	if err != nil {
		// The other end refused it (it no longer wants the port) or is gone: the program in the guest sees
		// its connection closed.
		conn.Close()
		return
	}
	go ssh.DiscardRequests(reqs)
	pipe(conn, ch, "forwarded-tcpip "+fw.key.String(), f.logf)
}

func (k forwardKey) String() string { return net.JoinHostPort(k.addr, strconv.Itoa(int(k.port))) }
