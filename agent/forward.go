package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// directTCPIPTimeout bounds the dial of a forwarded connection.
const directTCPIPTimeout = 10 * time.Second

// directTCPIPRequest is the payload of a "direct-tcpip" channel (RFC 4254 section 7.2).
type directTCPIPRequest struct {
	Host     string
	Port     uint32
	OrigHost string
	OrigPort uint32
}

// directTCPIP serves a "direct-tcpip" channel (what ssh -L opens): it dials the target from inside the guest and
// copies both ways, passing each direction's end of file on.
func directTCPIP(ctx context.Context, nch ssh.NewChannel, logf func(string, ...any)) {
	var r directTCPIPRequest
	if err := ssh.Unmarshal(nch.ExtraData(), &r); err != nil {
		_ = nch.Reject(ssh.ConnectionFailed, "malformed direct-tcpip request")
		return
	}
	addr := net.JoinHostPort(r.Host, strconv.Itoa(int(r.Port)))
	dctx, cancel := context.WithTimeout(ctx, directTCPIPTimeout)
	var d net.Dialer
	conn, err := d.DialContext(dctx, "tcp", addr)
	cancel()
	if err != nil {
		_ = nch.Reject(ssh.ConnectionFailed, err.Error())
		return
	}
	ch, reqs, err := nch.Accept()
	if err != nil {
		conn.Close()
		return
	}
	go ssh.DiscardRequests(reqs)
	pipe(conn, ch, "direct-tcpip "+addr, logf)
}

// pipe copies between conn and ch until both directions end, passing each direction's end of file on, and closes
// both. name says what it carries, for the log.
func pipe(conn net.Conn, ch ssh.Channel, name string, logf func(string, ...any)) {
	var wg sync.WaitGroup
	var once sync.Once
	abort := func() { once.Do(func() { conn.Close(); ch.Close() }) }
	wg.Add(2)
	go func() {
		defer wg.Done()
		if _, err := io.Copy(conn, ch); err != nil {
			abort()
			return
		}
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	go func() {
		defer wg.Done()
		if _, err := io.Copy(ch, conn); err != nil && !errors.Is(err, net.ErrClosed) {
			if logf != nil {
				logf("%s: %v", name, err)
			}
			abort()
			return
		}
		_ = ch.CloseWrite()
	}()
	wg.Wait()
	abort()
}
