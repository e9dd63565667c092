package agent

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestParseCmdline(t *testing.T) {
	def := DefaultBootConfig()
	with := func(f func(*BootConfig)) BootConfig {
		c := DefaultBootConfig()
		f(&c)
		return c
	}
	tests := []struct {
		name    string
		cmdline string
		want    BootConfig
		wantErr string // a substring of the error; "" for none
	}{
		{name: "empty", cmdline: "", want: def},
		{name: "others only", cmdline: "console=ttyS0 panic=-1 quiet root=/dev/sda\n", want: def},
		{
			name:    "all",
			cmdline: "console=ttyS0 boxd.root=/dev/vdb boxd.rootfstype=xfs boxd.hostname=dev-1 boxd.port=org.example.p boxd.ip=192.168.7.2/16 boxd.gw=192.168.0.1 boxd.dns=1.1.1.1,9.9.9.9\n",
			want: BootConfig{
				Root: "/dev/vdb", RootFSType: "xfs", Hostname: "dev-1", Port: "org.example.p",
				IP: netip.MustParsePrefix("192.168.7.2/16"), Gateway: netip.MustParseAddr("192.168.0.1"),
				DNS: []netip.Addr{netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("9.9.9.9")},
			},
		},
		{
			name:    "none",
			cmdline: "boxd.root=none boxd.ip=none boxd.gw=none boxd.dns=none",
			want: with(func(c *BootConfig) {
				c.Root, c.IP, c.Gateway, c.DNS = "none", netip.Prefix{}, netip.Addr{}, nil
			}),
		},
		{
			name:    "quoted",
			cmdline: `boxd.hostname="quoted" "boxd.root=/dev/vdc"`,
			want:    with(func(c *BootConfig) { c.Hostname, c.Root = "quoted", "/dev/vdc" }),
		},
		{name: "last wins", cmdline: "boxd.hostname=a boxd.hostname=b", want: with(func(c *BootConfig) { c.Hostname = "b" })},
		{
			name:    "unknown",
			cmdline: "boxd.future=1",
			want:    with(func(c *BootConfig) { c.Unknown = map[string]string{"boxd.future": "1"} }),
		},
		{name: "bad ip", cmdline: "boxd.ip=10.0.2.15", wantErr: "boxd.ip"},
		{name: "ipv6 ip", cmdline: "boxd.ip=fd00::2/64", wantErr: "boxd.ip"},
		{name: "bad gw", cmdline: "boxd.gw=gateway", wantErr: "boxd.gw"},
		{name: "bad dns", cmdline: "boxd.dns=1.1.1.1,x", wantErr: "boxd.dns"},
		{name: "bad hostname", cmdline: "boxd.hostname=a_b", wantErr: "boxd.hostname"},
		{name: "empty root", cmdline: "boxd.root=", wantErr: "boxd.root"},
		{name: "port with slash", cmdline: "boxd.port=../x", wantErr: "boxd.port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCmdline(tt.cmdline)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("ParseCmdline = %v, want an invalid-argument error naming %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParseCmdline =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestSplitCmdline(t *testing.T) {
	tests := []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  a  b\tc\n", []string{"a", "b", "c"}},
		{`x="a b" y`, []string{"x=a b", "y"}},
		{`"x=a b"`, []string{"x=a b"}},
		{`x=""`, []string{"x="}},
	}
	for _, tt := range tests {
		if got := splitCmdline(tt.in); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("splitCmdline(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
