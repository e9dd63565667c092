package agent

import (
	"net"
	"net/netip"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestConfigureLink configures lo in a network namespace of its own, the way the boot configures eth0: link up,
// an address with its prefix, a default route through a gateway.
func TestConfigureLink(t *testing.T) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		// The thread enters a new network namespace and is never unlocked, so it ends with this goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("cannot make a network namespace (needs root): %v", err)
			return
		}
		r, err := openRTNL()
		if err != nil {
			t.Error(err)
			return
		}
		defer r.Close()
		lo, err := net.InterfaceByName("lo")
		if err != nil {
			t.Error(err)
			return
		}
		cfg := BootConfig{IP: netip.MustParsePrefix("10.0.2.15/24"), Gateway: netip.MustParseAddr("10.0.2.2")}
		if err := configureLink(r, lo.Index, cfg); err != nil {
			t.Error(err)
			return
		}
		// Again: the boot may run twice over the same namespace state (an address that exists is fine).
		if err := configureLink(r, lo.Index, cfg); err != nil {
			t.Errorf("second configuration: %v", err)
		}
		lo, err = net.InterfaceByName("lo")
		if err != nil {
			t.Error(err)
			return
		}
		if lo.Flags&net.FlagUp == 0 {
			t.Error("lo is not up")
		}
		addrs, err := lo.Addrs()
		if err != nil {
			t.Error(err)
			return
		}
		found := false
		for _, a := range addrs {
			if a.String() == "10.0.2.15/24" {
				found = true
			}
		}
		if !found {
			t.Errorf("lo's addresses %v lack 10.0.2.15/24", addrs)
		}
		// The default route is there: a UDP "connection" to anywhere picks a source address through it.
		conn, err := net.Dial("udp4", "192.0.2.1:9")
		if err != nil {
			t.Errorf("no default route: %v", err)
			return
		}
		if local := conn.LocalAddr().(*net.UDPAddr).IP.String(); local != "10.0.2.15" {
			t.Errorf("route to 192.0.2.1 leaves from %s, want 10.0.2.15", local)
		}
		conn.Close()
	}()
	<-done
}
