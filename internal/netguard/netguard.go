// Package netguard keeps boxes' networks off the host: one nftables table
// that rejects what the uids of the boxes' network helpers send to the
// host's own addresses (loopback included) and to link-local ones, so that a
// box reaches the internet and DNS but no service of the host's, no cloud
// metadata server and no other box.
package netguard

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"

	"github.com/boxd-dev/boxd/errcat"
)

// Rules are what one table holds.
type Rules struct {
	// Table names the table, in family inet.
	Table string
	// FirstUID and LastUID are the uids the rules hold back: every uid a
	// box's network helper runs as.
	FirstUID, LastUID uint32
	// DNS are the resolvers the helpers forward queries to; they stay
	// reachable on port 53 even when they are host addresses (127.0.0.53).
	DNS []netip.Addr
	// Allow are the exceptions: host loopback ports one uid may reach.
	Allow []Allowance
}

// Allowance lets one uid reach TCP ports on the host's loopback.
type Allowance struct {
	UID   uint32
	Ports []uint16
}

// Script is the nft script that replaces the table with r's rules in one
// transaction: the table never exists half made. Only packets of a socket
// a uid of the range owns go through the guard chain: every other packet,
// those the kernel sends without a socket (a reset from a closed port, an
// ICMP error) included, passes as if the table were not there.
func (r Rules) Script() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %s\n", r.Table, r.Table)
	fmt.Fprintf(&b, "table inet %s {\n\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n", r.Table)
	fmt.Fprintf(&b, "\t\tmeta skuid %d-%d jump guard\n\t}\n\tchain guard {\n", r.FirstUID, r.LastUID)
	for _, a := range r.DNS {
		fam := "ip"
		if a.Is6() && !a.Is4In6() {
			fam = "ip6"
		}
		fmt.Fprintf(&b, "\t\t%s daddr %s meta l4proto { tcp, udp } th dport 53 accept\n", fam, a.Unmap())
	}
	for _, a := range r.Allow {
		if len(a.Ports) == 0 {
			continue
		}
		ports := make([]string, len(a.Ports))
		for i, p := range a.Ports {
			ports[i] = fmt.Sprint(p)
		}
		fmt.Fprintf(&b, "\t\tmeta skuid %d ip daddr 127.0.0.1 tcp dport { %s } accept\n", a.UID, strings.Join(ports, ", "))
	}
	b.WriteString("\t\tfib daddr type { local, broadcast, anycast, multicast } reject\n")
	b.WriteString("\t\tip daddr 169.254.0.0/16 reject\n")
	b.WriteString("\t\tip6 daddr fe80::/10 reject\n")
	b.WriteString("\t}\n}\n")
	return b.String()
}

// Install makes (or replaces) the table r names.
func Install(ctx context.Context, r Rules) error {
	if r.Table == "" || r.FirstUID == 0 || r.LastUID < r.FirstUID {
		return fmt.Errorf("netguard: table %q, uids %d-%d: want a name and a range of uids other than root", r.Table, r.FirstUID, r.LastUID)
	}
	return nft(ctx, r.Script())
}

// Remove deletes the table name; a table that is not there is no error.
func Remove(ctx context.Context, name string) error {
	return nft(ctx, fmt.Sprintf("table inet %s\ndelete table inet %s\n", name, name))
}

// Tables lists the host's tables of family inet whose names start with
// prefix.
func Tables(ctx context.Context, prefix string) ([]string, error) {
	path, err := nftPath()
	if err != nil {
		return nil, err
	}
	out, err := exec.CommandContext(ctx, path, "list", "tables", "inet").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("netguard: nft list tables: %w: %s", err, bytes.TrimSpace(out))
	}
	var names []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 3 && f[0] == "table" && strings.HasPrefix(f[2], prefix) {
			names = append(names, f[2])
		}
	}
	return names, nil
}

func nftPath() (string, error) {
	path, err := exec.LookPath("nft")
	if err != nil {
		if path, err = exec.LookPath("/usr/sbin/nft"); err != nil {
			return "", errcat.NotSupported("netguard: nft is missing (install the Debian package nftables): %w", err)
		}
	}
	return path, nil
}

func nft(ctx context.Context, script string) error {
	path, err := nftPath()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, path, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return errcat.NotSupported("netguard: nft: %w: %s", err, bytes.TrimSpace(out))
	}
	return nil
}

// Resolvers are the name servers a resolv.conf names: where passt forwards
// the guests' queries (it takes the first).
func Resolvers(resolvConf []byte) []netip.Addr {
	var addrs []netip.Addr
	for line := range bytes.Lines(resolvConf) {
		f := strings.Fields(string(line))
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(strings.SplitN(f[1], "%", 2)[0])
		if err == nil && !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	return addrs
}
