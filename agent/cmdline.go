package agent

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/containerd/errdefs"
)

// BootConfig is what the host tells the agent on the kernel command line, as boxd.KEY=VALUE parameters.
type BootConfig struct {
	Root       string            // boxd.root: the root disk's device node; "none" stays on the initramfs
	RootFSType string            // boxd.rootfstype: the root disk's filesystem
	Hostname   string            // boxd.hostname
	Port       string            // boxd.port: the name of the virtio-serial port to serve
	IP         netip.Prefix      // boxd.ip: eth0's address and prefix; "none" (invalid Prefix) leaves eth0 down
	Gateway    netip.Addr        // boxd.gw: the default route's gateway; "none" (invalid Addr) for no route
	DNS        []netip.Addr      // boxd.dns: name servers, comma-separated; "none" for no /etc/resolv.conf
	Unknown    map[string]string // boxd.* parameters the agent does not know, for the boot log
}

// DefaultBootConfig is the configuration of an empty command line: the addresses of a box's user network
// (QEMU's, and those runner/qemu gives passt).
func DefaultBootConfig() BootConfig {
	return BootConfig{
		Root:       "/dev/vda",
		RootFSType: "ext4",
		Hostname:   "box",
		Port:       DefaultPortName,
		IP:         netip.MustParsePrefix("10.0.2.15/24"),
		Gateway:    netip.MustParseAddr("10.0.2.2"),
		DNS:        []netip.Addr{netip.MustParseAddr("10.0.2.3")},
	}
}

// ParseCmdline reads the boxd.* parameters of a kernel command line (/proc/cmdline) over DefaultBootConfig.
// Values may be double-quoted, as the kernel allows. Other parameters are ignored. A bad value is an error that
// wraps errdefs.ErrInvalidArgument and names the parameter.
func ParseCmdline(cmdline string) (BootConfig, error) {
	cfg := DefaultBootConfig()
	for _, param := range splitCmdline(cmdline) {
		key, value, _ := strings.Cut(param, "=")
		name, ok := strings.CutPrefix(key, "boxd.")
		if !ok {
			continue
		}
		bad := func(why string) error {
			return fmt.Errorf("agent: kernel command line: %s=%q: %s: %w", key, value, why, errdefs.ErrInvalidArgument)
		}
		switch name {
		case "root":
			if value == "" {
				return cfg, bad("want a device node such as /dev/vda, or none")
			}
			cfg.Root = value
		case "rootfstype":
			if value == "" {
				return cfg, bad("want a filesystem type such as ext4")
			}
			cfg.RootFSType = value
		case "hostname":
			if err := ValidateHostname(value); err != nil {
				return cfg, bad("not a valid host name")
			}
			cfg.Hostname = value
		case "port":
			if value == "" || strings.ContainsRune(value, '/') {
				return cfg, bad("want a virtio-serial port name such as " + DefaultPortName)
			}
			cfg.Port = value
		case "ip":
			if value == "none" {
				cfg.IP = netip.Prefix{}
				continue
			}
			p, err := netip.ParsePrefix(value)
			if err != nil || !p.Addr().Is4() {
				return cfg, bad("want an IPv4 address with a prefix length such as 10.0.2.15/24, or none")
			}
			cfg.IP = p
		case "gw":
			if value == "none" {
				cfg.Gateway = netip.Addr{}
				continue
			}
			a, err := netip.ParseAddr(value)
			if err != nil || !a.Is4() {
				return cfg, bad("want an IPv4 address such as 10.0.2.2, or none")
			}
			cfg.Gateway = a
		case "dns":
			cfg.DNS = nil
			if value == "none" {
				continue
			}
			for _, s := range strings.Split(value, ",") {
				a, err := netip.ParseAddr(s)
				if err != nil {
					return cfg, bad("want IP addresses separated by commas, or none")
				}
				cfg.DNS = append(cfg.DNS, a)
			}
		default:
			if cfg.Unknown == nil {
				cfg.Unknown = map[string]string{}
			}
			cfg.Unknown[key] = value
		}
	}
	return cfg, nil
}

// splitCmdline splits a kernel command line into parameters at spaces outside double quotes, and drops the
// quotes, as the kernel's own parser does (next_arg in lib/cmdline.c).
func splitCmdline(s string) []string {
	var params []string
	var cur strings.Builder
	inQuote, inParam := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQuote, inParam = !inQuote, true
		case !inQuote && (r == ' ' || r == '\t' || r == '\n'):
			if inParam {
				params = append(params, cur.String())
				cur.Reset()
				inParam = false
			}
		default:
			cur.WriteRune(r)
			inParam = true
		}
	}
	if inParam {
		params = append(params, cur.String())
	}
	return params
}
