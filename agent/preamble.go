package agent

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// The channel preamble. A serial line keeps bytes across connections: what the host sent to a guest session that
// had not yet seen the host go away, what the guest wrote while no host listened. So before SSH starts, the host
// proves that the guest it talks to is a fresh session reading its bytes:
//
//	host:  BOXD-SYNC <nonce>\n   (again, soon and then every syncInterval, until acknowledged)
//	guest: BOXD-ACK <nonce>\n    (once per nonce; anything before a sync line is dropped)
//	host:  drops everything up to the acknowledgement, stops syncing, then starts SSH
//	guest: drops further sync lines up to the client's SSH version line, then starts SSH
//
// A sync line that reaches a guest session in the middle of an SSH connection breaks that connection at once (its
// first bytes make an impossible packet length), and the guest reopens its port, which drops what the old session
// left unread; the next sync line then reaches the fresh session. The nonce keeps an acknowledgement meant for an
// earlier connection from being taken for this one's.
//
// The guest also accepts a client that starts with its SSH version line, with no preamble (OpenSSH through a
// socket, for manual testing).
const (
	syncPrefix = "BOXD-SYNC "
	ackPrefix  = "BOXD-ACK "
	// The host repeats its sync line while unanswered: every syncFast for syncFastFor, then every
	// syncInterval. A guest whose session on the old channel ends at the first line (a box resumed, forked or
	// moved) reopens its port, which drops what came before, and answers the next line: that one must come
	// soon, not a whole syncInterval later.
	syncFast     = 10 * time.Millisecond
	syncFastFor  = 500 * time.Millisecond
	syncInterval = 100 * time.Millisecond
	// maxPreambleLine is the longest line the guest keeps whole while it looks for sync and version lines
	// (an SSH version line has at most 255 bytes and its line end); longer lines are dropped unread.
	maxPreambleLine = 257
)

// syncPause is the pause before the next sync line, elapsed after the first.
func syncPause(elapsed time.Duration) time.Duration {
	if elapsed < syncFastFor {
		return syncFast
	}
	return syncInterval
}

// newNonce returns a fresh random nonce for a sync line.
func newNonce() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// syncClient runs the host's side of the preamble on conn and returns the connection for SSH, positioned just
// after the guest's acknowledgement. conn's deadline bounds it.
func syncClient(conn net.Conn) (net.Conn, error) {
	nonce, err := newNonce()
	if err != nil {
		return nil, fmt.Errorf("agent: sync: %w", err)
	}
	line := []byte(syncPrefix + nonce + "\n")
	stop, stopped := make(chan struct{}), make(chan error, 1)
	go func() {
		began := time.Now()
		t := time.NewTimer(syncPause(0))
		defer t.Stop()
		for {
			if _, err := conn.Write(line); err != nil {
				stopped <- err
				return
			}
			select {
			case <-stop:
				stopped <- nil
				return
			case <-t.C:
			}
			t.Reset(syncPause(time.Since(began)))
		}
	}()

	br := bufio.NewReader(conn)
	err = skipUntil(br, []byte(ackPrefix+nonce+"\n"))
	close(stop)
	if werr := <-stopped; err == nil && werr != nil {
		err = werr
	}
	if err != nil {
		return nil, fmt.Errorf("agent: sync: %w", err)
	}
	return &prefixConn{Conn: conn, r: br}, nil
}

// skipUntil reads r up to and including the first occurrence of want.
func skipUntil(r *bufio.Reader, want []byte) error {
	matched := 0
	for matched < len(want) {
		c, err := r.ReadByte()
		if err != nil {
			return err
		}
		switch c {
		case want[matched]:
			matched++
		case want[0]:
			matched = 1 // want's first byte occurs only at its start
		default:
			matched = 0
		}
	}
	return nil
}

// acceptPreamble runs the guest's side of the preamble on conn and returns the connection positioned at the
// client's SSH version line, or, for a host that starts a link (see linkwire.go), just after its hello line, which
// it returns too. conn's deadline bounds it.
func acceptPreamble(conn net.Conn) (pc net.Conn, linkHello []byte, err error) {
	br := bufio.NewReaderSize(conn, 4096)
	acked := ""
	for {
		line, whole, err := readPreambleLine(br)
		if err != nil {
			return nil, nil, fmt.Errorf("agent: preamble: %w", err)
		}
		if !whole {
			continue // too long for a line of ours: stale bytes
		}
		if nonce, ok := bytes.CutPrefix(bytes.TrimRight(line, "\r\n"), []byte(syncPrefix)); ok {
			if isNonce(nonce) && string(nonce) != acked {
				if _, err := conn.Write([]byte(ackPrefix + string(nonce) + "\n")); err != nil {
					return nil, nil, fmt.Errorf("agent: preamble: %w", err)
				}
				acked = string(nonce)
			}
			continue
		}
		if isLinkHello(line) {
			return &prefixConn{Conn: conn, r: br}, line, nil
		}
		if bytes.HasPrefix(line, []byte("SSH-")) {
			return &prefixConn{Conn: conn, r: io.MultiReader(bytes.NewReader(line), br)}, nil, nil
		}
		// Anything else is left over from an earlier connection.
	}
}

// readPreambleLine reads one line, with its '\n'. whole is false for a line longer than maxPreambleLine, whose
// bytes are dropped.
func readPreambleLine(r *bufio.Reader) (line []byte, whole bool, err error) {
	var buf []byte
	whole = true
	for {
		frag, err := r.ReadSlice('\n')
		if whole {
			buf = append(buf, frag...)
			if len(buf) > maxPreambleLine {
				whole, buf = false, nil
			}
		}
		switch {
		case err == nil:
			return buf, whole, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		default:
			return nil, false, err
		}
	}
}

func isNonce(b []byte) bool {
	if len(b) == 0 || len(b) > 64 {
		return false
	}
	for _, c := range b {
		if !isLowerHex(rune(c)) {
			return false
		}
	}
	return true
}

// prefixConn is a net.Conn whose reads come from r (bytes already read from Conn, then Conn).
type prefixConn struct {
	net.Conn
	r io.Reader
}

func (c *prefixConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// held returns the bytes read from Conn and not yet read from c, where r is a bufio.Reader straight over Conn (as
// acceptPreamble leaves it).
func (c *prefixConn) held() []byte {
	br, ok := c.r.(*bufio.Reader)
	if !ok {
		return nil
	}
	b, _ := br.Peek(br.Buffered())
	return b
}
