package box_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/containerd/errdefs"
)

// TestBoxNetwork checks that a box reaches an address outside the host (a
// network namespace the test makes stands in for the internet) and DNS,
// but no service on the host's loopback: not by the gateway address, not by
// any of the host's own addresses, and not through the agent's direct-tcpip
// channel, which carries `ssh -L` through the front door.
func TestBoxNetwork(t *testing.T) {
	mgr, _ := boxtest.NewManager(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	secret := serveHTTP(t, "127.0.0.1:0", "host-loopback")
	_, port, _ := net.SplitHostPort(secret)
	outside := newOutside(ctx, t)

	if _, err := mgr.Create(ctx, box.CreateOptions{Name: "net", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}}); err != nil {
		t.Fatal(err)
	}

	t.Run("Outside", func(t *testing.T) {
		if got := fetch(ctx, t, mgr, "net", outside); got != "outside" {
			t.Errorf("from the box, %s answered %q, want %q", outside, got, "outside")
		}
	})

	t.Run("HostLoopback", func(t *testing.T) {
		targets := append([]string{"10.0.2.2"}, hostAddrs(t)...)
		for _, a := range targets {
			if got := fetch(ctx, t, mgr, "net", net.JoinHostPort(a, port)); got != "" {
				t.Errorf("from the box, the host's loopback server answered at %s: %q", a, got)
			}
		}
	})

	t.Run("Forward", func(t *testing.T) {
		c, err := mgr.Client(ctx, "net")
		if err != nil {
			t.Fatal(err)
		}
		// The channel ssh -L opens: the agent dials from inside the box.
		if conn, err := c.SSH().Dial("tcp", net.JoinHostPort("10.0.2.2", port)); err == nil {
			_, _ = fmt.Fprintf(conn, "GET / HTTP/1.0\r\n\r\n")
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			b := make([]byte, 512)
			n, _ := conn.Read(b)
			conn.Close()
			if bytes.Contains(b[:n], []byte("host-loopback")) {
				t.Errorf("a forward to 10.0.2.2:%s reached the host's loopback: %q", port, b[:n])
			}
		}
	})

	t.Run("HostPorts", func(t *testing.T) {
		open := serveHTTP(t, "127.0.0.1:0", "exposed")
		_, openPort, _ := net.SplitHostPort(open)
		var p uint16
		_, _ = fmt.Sscan(openPort, &p)
		bx, err := mgr.Create(ctx, box.CreateOptions{Name: "open", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}, HostPorts: []uint16{p, p}})
		if err != nil {
			t.Fatal(err)
		}
		if len(bx.HostPorts) != 1 || bx.HostPorts[0] != p {
			t.Errorf("host ports %v, want [%d]", bx.HostPorts, p)
		}
		gw := func(port string) string { return net.JoinHostPort("10.0.2.2", port) }
		if got := fetch(ctx, t, mgr, "open", gw(openPort)); got != "exposed" {
			t.Errorf("box open, allowed host port %s: %q, want %q", openPort, got, "exposed")
		}
		if got := fetch(ctx, t, mgr, "open", gw(port)); got != "" {
			t.Errorf("box open reached host port %s, which it was not allowed: %q", port, got)
		}
		if got := fetch(ctx, t, mgr, "net", gw(openPort)); got != "" {
			t.Errorf("box net reached host port %s, which only box open may: %q", openPort, got)
		}
		if got := fetch(ctx, t, mgr, "open", outside); got != "outside" {
			t.Errorf("box open, outside: %q", got)
		}

		// A fork is a box that was not made with the allowance; the box
		// itself keeps it across hibernation.
		if _, err := mgr.Fork(ctx, "open", []string{"open-child"}); err != nil {
			t.Fatal(err)
		}
		if got := fetch(ctx, t, mgr, "open-child", gw(openPort)); got != "" {
			t.Errorf("a fork of box open reached host port %s: %q", openPort, got)
		}
		if got := fetch(ctx, t, mgr, "open-child", outside); got != "outside" {
			t.Errorf("a fork of box open, outside: %q", got)
		}
		if _, err := mgr.Hibernate(ctx, "open"); err != nil {
			t.Fatal(err)
		}
		if _, err := mgr.Resume(ctx, "open"); err != nil {
			t.Fatal(err)
		}
		if got := fetch(ctx, t, mgr, "open", gw(openPort)); got != "exposed" {
			t.Errorf("box open after hibernation, allowed host port %s: %q, want %q", openPort, got, "exposed")
		}
		if _, err := mgr.Create(ctx, box.CreateOptions{Name: "bad", Image: boxtest.Image, HostPorts: []uint16{0}}); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("host port 0: %v, want invalid argument", err)
		}
	})

	t.Run("DNS", func(t *testing.T) {
		const name = "deb.debian.org"
		want, err := net.DefaultResolver.LookupHost(ctx, name)
		if err != nil || len(want) == 0 {
			t.Skipf("the host's resolver does not answer for %s (%v): nothing to forward to", name, err)
		}
		var out, errb bytes.Buffer
		code, err := mgr.Exec(ctx, "net", agent.Command{Shell: "nslookup " + name, Stdout: &out, Stderr: &errb})
		if err != nil || code != 0 {
			t.Fatalf("nslookup %s in the box: exit %d, %v: %s%s", name, code, err, out.String(), errb.String())
		}
		found := false
		for _, a := range want {
			found = found || strings.Contains(out.String(), a)
		}
		if !found {
			t.Errorf("nslookup %s in the box said %q; the host resolves it to %v", name, out.String(), want)
		}
	})
}

// fetch is what an HTTP GET of addr from box name answered, "" when it
// failed. nc's input stays open until the server has answered and closed:
// passt 0.0~git20230309 (Debian 12) garbles what a guest receives after the
// guest has shut down its own sending side, as nc does at the end of its
// input (see README, "Box networks").
func fetch(ctx context.Context, t *testing.T, mgr *box.Manager, name, addr string) string {
	t.Helper()
	var out, errb bytes.Buffer
	host, port, _ := net.SplitHostPort(addr)
	line := fmt.Sprintf(`(printf 'GET / HTTP/1.0\r\n\r\n'; sleep 2) | timeout 10 nc -w 3 %s %s`, host, port)
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	code, err := mgr.Exec(ctx, name, agent.Command{Shell: line, Stdout: &out, Stderr: &errb})
	if err != nil {
		t.Fatalf("%s: %s: %v", name, line, err)
	}
	if code != 0 {
		t.Logf("%s: %s: exit %d: %s", name, line, code, strings.TrimSpace(errb.String()))
	}
	resp := out.String()
	if _, body, ok := strings.Cut(resp, "\r\n\r\n"); ok {
		return strings.TrimSpace(body)
	}
	return strings.TrimSpace(resp)
}

// serveHTTP serves body at addr on the host until t ends and returns the
// address it listens on.
func serveHTTP(t *testing.T, addr, body string) string {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = fmt.Fprintln(w, body)
	}), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return l.Addr().String()
}

// hostAddrs are the host's own IPv4 addresses.
func hostAddrs(t *testing.T) []string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
			out = append(out, ipn.IP.String())
		}
	}
	return out
}

// newOutside makes a network namespace joined to the host's by a veth pair,
// routed from the host, with an HTTP server answering "outside" on port
// 8080, and returns the server's address. All of it goes when t ends.
func newOutside(ctx context.Context, t *testing.T) string {
	t.Helper()
	busybox := testutil.StaticBusybox(ctx, t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip (iproute2) is missing: %v", err)
	}
	tag := fmt.Sprintf("%d", os.Getpid()%100000)
	ns, hostIf, nsIf := "boxdt-"+tag, "bxh"+tag, "bxn"+tag
	octet := os.Getpid()%200 + 20
	hostIP, nsIP := fmt.Sprintf("198.18.%d.1", octet), fmt.Sprintf("198.18.%d.2", octet)
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	ip("netns", "add", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", ns).Run() })
	ip("link", "add", hostIf, "type", "veth", "peer", "name", nsIf, "netns", ns)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "delete", hostIf).Run() })
	ip("addr", "add", hostIP+"/30", "dev", hostIf)
	ip("link", "set", hostIf, "up")
	ip("-n", ns, "addr", "add", nsIP+"/30", "dev", nsIf)
	ip("-n", ns, "link", "set", nsIf, "up")
	ip("-n", ns, "link", "set", "lo", "up")

	www := t.TempDir()
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("outside\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := nsIP + ":8080"
	srv := exec.Command("ip", "netns", "exec", ns, busybox, "httpd", "-f", "-p", addr, "-h", www)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = srv.Process.Kill()
		_ = srv.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("the outside server at %s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
