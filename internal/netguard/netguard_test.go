package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/testutil"
)

func TestResolvers(t *testing.T) {
	conf := "# by hand\nsearch example.org\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nnameserver 127.0.0.53\noptions edns0\nnameserver bogus\n"
	got := Resolvers([]byte(conf))
	want := []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("fe80::1")}
	if !slices.Equal(got, want) {
		t.Errorf("Resolvers = %v, want %v", got, want)
	}
}

func TestScript(t *testing.T) {
	r := Rules{
		Table: "boxd_t", FirstUID: 1000, LastUID: 1255,
		DNS:   []netip.Addr{netip.MustParseAddr("127.0.0.53"), netip.MustParseAddr("::1")},
		Allow: []Allowance{{UID: 1001, Ports: []uint16{80, 8080}}, {UID: 1002}},
	}
	s := r.Script()
	for _, want := range []string{
		"table inet boxd_t\ndelete table inet boxd_t\ntable inet boxd_t {",
		"meta skuid 1000-1255 jump guard",
		"chain guard {",
		"ip daddr 127.0.0.53 meta l4proto { tcp, udp } th dport 53 accept",
		"ip6 daddr ::1 meta l4proto { tcp, udp } th dport 53 accept",
		"meta skuid 1001 ip daddr 127.0.0.1 tcp dport { 80, 8080 } accept",
		"fib daddr type { local, broadcast, anycast, multicast } reject",
		"ip daddr 169.254.0.0/16 reject",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "skuid 1002") {
		t.Errorf("an allowance without ports made a rule:\n%s", s)
	}
	// The exceptions come before the rejections.
	if strings.Index(s, "dport { 80, 8080 } accept") > strings.Index(s, "reject") {
		t.Errorf("an allowance after the rejections:\n%s", s)
	}
	if err := Install(context.Background(), Rules{Table: "x"}); err == nil {
		t.Error("Install took rules without uids")
	}
}

var busybox string

// TestInstall installs a table on the host and checks, as one of its uids,
// that the host's loopback and own addresses refuse and an allowed port
// answers; the table is removed again.
func TestInstall(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("changes the host's nftables rules: needs root")
	}
	if _, err := nftPath(); err != nil {
		t.Skipf("no nft: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	busybox = testutil.StaticBusybox(ctx, t)
	const first = 0x7ffe0000
	table := fmt.Sprintf("boxd_test%d", os.Getpid())
	denied, allowed := listen(t), listen(t)
	_, allowedPort, _ := net.SplitHostPort(allowed)
	var port uint16
	_, _ = fmt.Sscan(allowedPort, &port)
	r := Rules{Table: table, FirstUID: first, LastUID: first + 255, Allow: []Allowance{{UID: first + 1, Ports: []uint16{port}}}}
	if err := Install(ctx, r); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Remove(context.Background(), table); err != nil {
			t.Error(err)
		}
		if names, _ := Tables(context.Background(), table); len(names) != 0 {
			t.Errorf("table %s left behind", table)
		}
	})
	if names, err := Tables(ctx, table); err != nil || !slices.Equal(names, []string{table}) {
		t.Fatalf("Tables = %v, %v", names, err)
	}
	// A second Install replaces the table.
	if err := Install(ctx, r); err != nil {
		t.Fatal(err)
	}

	_, deniedPort, _ := net.SplitHostPort(denied)
	for _, tc := range []struct {
		uid  uint32
		addr string
		ok   bool
	}{
		{0, denied, true},
		{first, denied, false},
		{first + 1, denied, false},
		{first + 1, allowed, true},
		{first, allowed, false},
		{first + 256, denied, true}, // outside the range
	} {
		if got := dialAs(t, tc.uid, tc.addr); got != tc.ok {
			t.Errorf("uid %d dialling %s: connected %v, want %v", tc.uid, tc.addr, got, tc.ok)
		}
	}
	// Everyone else's traffic passes untouched, the resets the kernel
	// sends without a socket included: a closed port refuses at once.
	c, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := c.Addr().String()
	c.Close()
	if _, err := net.DialTimeout("tcp", closedAddr, 5*time.Second); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("root dialling a closed loopback port with the table installed: %v, want connection refused", err)
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			if dialAs(t, first, net.JoinHostPort(ipn.IP.String(), deniedPort)) {
				t.Errorf("uid %d reached the host's %s", first, ipn.IP)
			}
		}
	}
}

// listen serves (accepts and closes) on a new port of the host's loopback
// on every address, and returns its 127.0.0.1 address.
func listen(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return "127.0.0.1:" + port
}

// dialAs says whether a process running as uid connects to addr (busybox
// nc: the test binary's folder is root's alone).
func dialAs(t *testing.T, uid uint32, addr string) bool {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command(busybox, "nc", "-w", "3", host, port)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	err := cmd.Run()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatal(err)
	}
	return err == nil
}
