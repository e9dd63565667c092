package qemu

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/errcat"
)

// A machine's network (runner.NetworkUser) is a passt process of its own,
// not QEMU's built-in slirp: slirp always maps the gateway (10.0.2.2) to the
// host's loopback, so every service bound to the host's 127.0.0.1 answered
// boxes. passt is told not to map the gateway (--no-map-gw) and runs as
// Runner.NetUID, an unprivileged uid that the host's firewall keeps off the
// host's own addresses (package backends installs it): what a box reaches,
// it reaches as that uid.
//
// passt and QEMU talk over a socket pair boxd makes: passt gets one end
// (--fd), QEMU the other (-netdev stream,addr.type=fd). There is no socket
// file to race for, and passt's life is its QEMU's: it exits when the
// stream closes, which happens when QEMU exits, or, before QEMU holds its
// end, when boxd closes it or dies. Each QEMU (a spare, a restore) has its
// own passt.

// The addresses a box's network has. They are QEMU's user-network ones, which
// the guest agent configures statically (agent.BootConfig).
const (
	guestAddr   = "10.0.2.15"
	guestPrefix = "24"
	gatewayAddr = "10.0.2.2"
	dnsAddr     = "10.0.2.3"
)

// netFD is the descriptor number QEMU finds its end of the stream at
// (the first of exec.Cmd.ExtraFiles).
const netFD = 3

// A machine with host ports (runner.Spec.HostPorts) has its gateway mapped
// to the host's loopback, and its passt runs as a uid of its own that
// Runner.Expose lets reach those ports alone.

// netHelper is a machine's passt process.
type netHelper struct {
	cmd     *exec.Cmd
	qemu    *os.File // QEMU's end of the stream, until QEMU has started
	done    chan struct{}
	release func() // gives back the host ports' uid, once passt has exited
}

// passtArgs are passt's arguments for a stream on descriptor fd; mapGW maps
// the gateway to the host's loopback.
func passtArgs(fd int, mapGW bool) []string {
	args := []string{
		"--foreground", "--quiet", "--stderr",
		"--ipv4-only",
		"--address", guestAddr, "--netmask", guestPrefix, "--gateway", gatewayAddr,
		// Queries the guest sends to 10.0.2.3 go to the host's resolver.
		"--dns-forward", dnsAddr,
		"--fd", fmt.Sprint(fd),
	}
	if !mapGW {
		args = append(args, "--no-map-gw")
	}
	return args
}

// startNet starts a machine's passt. The caller gives h.qemu to QEMU and
// then calls h.started.
func (r *Runner) startNet(ctx context.Context, id string, hostPorts []uint16, out io.Writer) (*netHelper, error) {
	if r.NetErr != nil {
		return nil, fmt.Errorf("qemu: %s: no network: %w", id, r.NetErr)
	}
	uid, release := r.NetUID, func() {}
	if len(hostPorts) > 0 {
		if r.Expose == nil {
			return nil, errcat.NotSupported("qemu: %s: host ports %v: this runner has no firewall to open them (Runner.Expose)", id, hostPorts)
		}
		var err error
		if uid, release, err = r.Expose(ctx, hostPorts); err != nil {
			return nil, fmt.Errorf("qemu: %s: host ports %v: %w", id, hostPorts, err)
		}
	}
	h, err := r.startPasst(id, uid, len(hostPorts) > 0, out)
	if err != nil {
		release()
		return nil, err
	}
	h.release = release
	return h, nil
}

// startPasst starts passt as uid (0: passt's choice).
func (r *Runner) startPasst(id string, uid uint32, mapGW bool, out io.Writer) (*netHelper, error) {
	bin := r.Passt
	if bin == "" {
		bin = "passt"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, errcat.NotSupported("qemu: %s is missing (install the Debian package passt): %w", bin, err)
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("qemu: %s: network stream: %w", id, err)
	}
	passtEnd := os.NewFile(uintptr(fds[0]), "passt")
	h := &netHelper{qemu: os.NewFile(uintptr(fds[1]), "qemu"), done: make(chan struct{})}
	h.cmd = exec.Command(path, passtArgs(netFD, mapGW)...)
	h.cmd.ExtraFiles = []*os.File{passtEnd}
	h.cmd.Stdout, h.cmd.Stderr = out, out
	if uid != 0 {
		h.cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	}
	err = h.cmd.Start()
	passtEnd.Close()
	if err != nil {
		h.qemu.Close()
		return nil, fmt.Errorf("qemu: %s: starting passt: %w", id, err)
	}
	go func() {
		_ = h.cmd.Wait()
		close(h.done)
	}()
	return h, nil
}

// started closes boxd's copy of QEMU's end once QEMU holds its own (or did
// not start): from then on the stream ends when QEMU does.
func (h *netHelper) started() {
	if h != nil && h.qemu != nil {
		h.qemu.Close()
		h.qemu = nil
	}
}

// netExitGrace is how long a machine's end waits for passt to see the
// stream close before killing it.
const netExitGrace = 2 * time.Second

// stop waits for passt to exit, which it does once QEMU has, and kills it
// if it has not within netExitGrace.
func (h *netHelper) stop() {
	if h == nil {
		return
	}
	h.started()
	select {
	case <-h.done:
	case <-time.After(netExitGrace):
		_ = h.cmd.Process.Kill()
		<-h.done
	}
	if h.release != nil {
		h.release()
		h.release = nil
	}
}

// netArgs are QEMU's network arguments for a machine whose passt has the
// other end of descriptor netFD.
func netArgs() []string {
	return []string{
		"-netdev", "stream,id=net0,server=off,addr.type=fd,addr.str=" + fmt.Sprint(netFD),
		"-device", "virtio-net-pci,netdev=net0,romfile=,addr=" + slotNet,
	}
}
