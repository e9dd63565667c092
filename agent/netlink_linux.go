package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// rtnl is a route netlink socket: just enough of it to bring a link up, give it an address and add a default
// route, which is all a box needs and saves the agent a netlink library.
type rtnl struct {
	fd  int
	seq uint32
}

func openRTNL() (*rtnl, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("agent: netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("agent: netlink bind: %w", err)
	}
	return &rtnl{fd: fd}, nil
}

func (r *rtnl) Close() error { return unix.Close(r.fd) }

// nlmsg builds one netlink message: the header, a fixed body, then attributes.
type nlmsg struct {
	b []byte
}

func newNLMsg(typ, flags uint16, body []byte) *nlmsg {
	m := &nlmsg{b: make([]byte, unix.NLMSG_HDRLEN, 256)}
	binary.NativeEndian.PutUint16(m.b[4:], typ)
	binary.NativeEndian.PutUint16(m.b[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	m.b = append(m.b, body...)
	m.pad()
	return m
}

// attr appends a route attribute (struct rtattr and its data, padded to 4 bytes).
func (m *nlmsg) attr(typ uint16, data []byte) {
	var h [4]byte
	binary.NativeEndian.PutUint16(h[0:], uint16(unix.SizeofRtAttr+len(data)))
	binary.NativeEndian.PutUint16(h[2:], typ)
	m.b = append(m.b, h[:]...)
	m.b = append(m.b, data...)
	m.pad()
}

func (m *nlmsg) pad() {
	for len(m.b)%unix.NLMSG_ALIGNTO != 0 {
		m.b = append(m.b, 0)
	}
}

// do sends m and waits for the kernel's acknowledgement, returning its error (an errno) if any.
func (r *rtnl) do(m *nlmsg) error {
	r.seq++
	binary.NativeEndian.PutUint32(m.b[0:], uint32(len(m.b)))
	binary.NativeEndian.PutUint32(m.b[8:], r.seq)
	if err := unix.Sendto(r.fd, m.b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 8192)
	for {
		n, _, err := unix.Recvfrom(r.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		for b := buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b[0:]))
			typ := binary.NativeEndian.Uint16(b[4:])
			seq := binary.NativeEndian.Uint32(b[8:])
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return fmt.Errorf("netlink: malformed reply")
			}
			if seq == r.seq && typ == unix.NLMSG_ERROR {
				if l < unix.NLMSG_HDRLEN+4 {
					return fmt.Errorf("netlink: short error reply")
				}
				if errno := int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:])); errno != 0 {
					return unix.Errno(-errno)
				}
				return nil
			}
			l = (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
			if l > len(b) {
				break
			}
			b = b[l:]
		}
	}
}

// linkUp sets the link with index up (ip link set dev X up).
func (r *rtnl) linkUp(index int) error {
	// struct ifinfomsg { u8 family, pad; u16 type; s32 index; u32 flags, change; }
	body := make([]byte, unix.SizeofIfInfomsg)
	binary.NativeEndian.PutUint32(body[4:], uint32(index))
	binary.NativeEndian.PutUint32(body[8:], unix.IFF_UP)
	binary.NativeEndian.PutUint32(body[12:], unix.IFF_UP)
	if err := r.do(newNLMsg(unix.RTM_NEWLINK, 0, body)); err != nil {
		return fmt.Errorf("agent: link %d up: %w", index, err)
	}
	return nil
}

// addAddr gives the link with index the IPv4 address p (ip addr add P dev X); an address it has already is fine.
func (r *rtnl) addAddr(index int, p netip.Prefix) error {
	// struct ifaddrmsg { u8 family, prefixlen, flags, scope; u32 index; }
	body := make([]byte, unix.SizeofIfAddrmsg)
	body[0] = unix.AF_INET
	body[1] = uint8(p.Bits())
	body[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(body[4:], uint32(index))
	m := newNLMsg(unix.RTM_NEWADDR, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body)
	a := p.Addr().As4()
	m.attr(unix.IFA_LOCAL, a[:])
	m.attr(unix.IFA_ADDRESS, a[:])
	if p.Bits() < 31 {
		brd := binary.BigEndian.Uint32(a[:]) | (1<<(32-p.Bits()) - 1)
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], brd)
		m.attr(unix.IFA_BROADCAST, b[:])
	}
	if err := r.do(m); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("agent: address %s on link %d: %w", p, index, err)
	}
	return nil
}

// addDefaultRoute adds the IPv4 default route through gw on the link with index (ip route replace default via GW
// dev X).
func (r *rtnl) addDefaultRoute(index int, gw netip.Addr) error {
	// struct rtmsg { u8 family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags; }
	body := make([]byte, unix.SizeofRtMsg)
	body[0] = unix.AF_INET
	body[4] = unix.RT_TABLE_MAIN
	body[5] = unix.RTPROT_BOOT
	body[6] = unix.RT_SCOPE_UNIVERSE
	body[7] = unix.RTN_UNICAST
	m := newNLMsg(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, body)
	g := gw.As4()
	m.attr(unix.RTA_GATEWAY, g[:])
	var oif [4]byte
	binary.NativeEndian.PutUint32(oif[:], uint32(index))
	m.attr(unix.RTA_OIF, oif[:])
	if err := r.do(m); err != nil {
		return fmt.Errorf("agent: default route via %s: %w", gw, err)
	}
	return nil
}
