package agent

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// TestRemoteForward checks tcpip-forward at the agent: it listens on loopback for "localhost", opens
// forwarded-tcpip channels that carry the request's tag, cancels only for the same tag, and closes every listener
// when the connection ends.
func TestRemoteForward(t *testing.T) {
	c := serve(t, nil)
	chans := c.SSH().HandleChannelOpen(ChannelForwardedTCPIP)
	tag := []byte("conn-1")

	ok, reply, err := c.SSH().SendRequest(RequestTCPIPForward, true, ssh.Marshal(ForwardRequest{Addr: "localhost", Tag: tag}))
	if err != nil || !ok {
		t.Fatalf("tcpip-forward: %v, %v", ok, err)
	}
	var r ForwardReply
	if err := ssh.Unmarshal(reply, &r); err != nil || r.Port == 0 {
		t.Fatalf("reply %x: %v", reply, err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(r.Port)))

	// A program in the guest connects; the channel carries the tag, and data goes both ways.
	go func() {
		nch := <-chans
		var m ForwardedTCPIP
		if err := ssh.Unmarshal(nch.ExtraData(), &m); err != nil || m.Addr != "localhost" || m.Port != r.Port ||
			m.OrigAddr != "127.0.0.1" || !bytes.Equal(m.Tag, tag) {
			nch.Reject(ssh.Prohibited, "unexpected extra data")
			return
		}
		ch, reqs, err := nch.Accept()
		if err != nil {
			return
		}
		go ssh.DiscardRequests(reqs)
		io.Copy(ch, strings.NewReader("from the host\n"))
		ch.CloseWrite()
		io.Copy(io.Discard, ch)
		ch.Close()
	}()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(conn)
	conn.Close()
	if err != nil || string(got) != "from the host\n" {
		t.Fatalf("read %q, %v", got, err)
	}

	cancelReq := func(tag string) bool {
		ok, _, err := c.SSH().SendRequest(RequestCancelTCPIPForward, true,
			ssh.Marshal(ForwardRequest{Addr: "localhost", Port: r.Port, Tag: []byte(tag)}))
		return ok && err == nil
	}
	if cancelReq("conn-2") {
		t.Error("another tag cancelled the forward")
	}
	if !cancelReq("conn-1") {
		t.Fatal("cancel refused")
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("the port is still open after cancel")
	}

	// The connection's end closes what it still listens on.
	ok, reply, err = c.SSH().SendRequest(RequestTCPIPForward, true, ssh.Marshal(ForwardRequest{Addr: "127.0.0.1", Tag: tag}))
	if err != nil || !ok || ssh.Unmarshal(reply, &r) != nil {
		t.Fatalf("tcpip-forward: %v, %v", ok, err)
	}
	c.Close()
	addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(int(r.Port)))
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(end) {
			t.Fatal("the port outlived the connection")
		}
	}
}

// TestAuthAgent checks auth-agent-req@openssh.com at the agent: the session's command finds SSH_AUTH_SOCK, a
// connection to it opens an auth-agent@openssh.com channel with the tag, and the socket goes with the session.
func TestAuthAgent(t *testing.T) {
	c := serve(t, nil)
	chans := c.SSH().HandleChannelOpen(ChannelAuthAgent)
	go func() {
		for nch := range chans {
			if string(nch.ExtraData()) != "conn-1" {
				nch.Reject(ssh.Prohibited, "unexpected tag")
				continue
			}
			ch, reqs, err := nch.Accept()
			if err != nil {
				continue
			}
			go ssh.DiscardRequests(reqs)
			io.Copy(ch, strings.NewReader("agent answer\n"))
			ch.Close()
		}
	}()
	s, err := c.SSH().NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ok, err := s.SendRequest(RequestAuthAgent, true, []byte("conn-1")); !ok || err != nil {
		t.Fatalf("auth-agent-req: %v, %v", ok, err)
	}
	out, err := s.Output(`echo "$SSH_AUTH_SOCK"`)
	if err != nil {
		t.Fatal(err)
	}
	path := strings.TrimSpace(string(out))
	if path == "" {
		t.Fatal("no SSH_AUTH_SOCK")
	}
	// The session has ended with its command: the socket is gone.
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); os.IsNotExist(err) {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("%s outlived its session", path)
		}
	}

	// While a session lives, its socket answers.
	s2, err := c.SSH().NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if ok, err := s2.SendRequest(RequestAuthAgent, true, []byte("conn-1")); !ok || err != nil {
		t.Fatalf("auth-agent-req: %v, %v", ok, err)
	}
	stdout, err := s2.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := s2.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Start(`echo "$SSH_AUTH_SOCK"; read line`); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(conn)
	conn.Close()
	if string(got) != "agent answer\n" {
		t.Errorf("read %q from the agent socket", got)
	}
	stdin.Close()
	s2.Wait()
}
