package agent

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// Global requests the agent answers besides SSH's own.
const (
	// RequestHealth asks for the guest's Health as JSON.
	RequestHealth = "boxd-health@boxd.dev"
	// RequestUnique carries a Unique as JSON; the agent applies it and replies ok, or not ok with an error message.
	RequestUnique = "boxd-unique@boxd.dev"
)

// The channels the agent opens back towards the person behind the host's SSH front door, and the requests that
// ask for them (RFC 4254 section 7.1, OpenSSH's PROTOCOL file). The front door relays many people's connections
// over the host's one connection to the agent, so each such request may carry a tag after its standard fields
// (for auth-agent-req@openssh.com, whose standard payload is empty, the tag is the whole payload), and the agent
// puts the same tag after the standard fields of every channel it opens because of that request: the front door
// routes the channel to the connection the tag names. The tag is opaque to the agent; a request without one gets
// channels without one, as from OpenSSH's sshd.
const (
	// RequestTCPIPForward asks the agent to listen in the guest and open a ChannelForwardedTCPIP for each
	// connection (ssh -R). Payload: ForwardRequest.
	RequestTCPIPForward = "tcpip-forward"
	// RequestCancelTCPIPForward closes the listener of an earlier RequestTCPIPForward with the same address,
	// port and tag.
	RequestCancelTCPIPForward = "cancel-tcpip-forward"
	// ChannelForwardedTCPIP carries one connection to a forwarded port. Extra data: ForwardedTCPIP.
	ChannelForwardedTCPIP = "forwarded-tcpip"
	// RequestAuthAgent, on a session before its command starts, makes the agent serve an SSH agent socket in
	// the guest for that session (ssh -A): SSH_AUTH_SOCK names it in the command's environment, and each
	// connection to it opens a ChannelAuthAgent. The socket goes when the session ends.
	RequestAuthAgent = "auth-agent-req@openssh.com"
	// ChannelAuthAgent carries one connection to a session's agent socket. Extra data: the tag.
	ChannelAuthAgent = "auth-agent@openssh.com"
)

// maxTag bounds a request's tag.
const maxTag = 256

// ForwardRequest is the payload of RequestTCPIPForward and RequestCancelTCPIPForward.
//
// Addr says where the agent listens in the guest: "localhost" (what OpenSSH sends for ssh -R PORT:...) means the
// loopback addresses 127.0.0.1 and ::1; "" and "*" mean every address; anything else (an IP address, a host
// name the guest resolves) is used as given. Port 0 asks for a free port, which the reply carries
// (ForwardReply).
type ForwardRequest struct {
	Addr string
	Port uint32
	Tag  []byte `ssh:"rest"`
}

// ForwardReply is the reply to a RequestTCPIPForward for port 0: the port the agent listens on.
type ForwardReply struct {
	Port uint32
}

// ForwardedTCPIP is the extra data of a ChannelForwardedTCPIP: the address and port as the request named them
// (the port the agent chose for port 0), who connected, and the request's tag.
type ForwardedTCPIP struct {
	Addr     string
	Port     uint32
	OrigAddr string
	OrigPort uint32
	Tag      []byte `ssh:"rest"`
}

// DefaultPortName is the name of the virtio-serial port the agent serves (QEMU's virtserialport name=).
const DefaultPortName = "org.boxd.agent"

// Health is the guest's answer to RequestHealth.
type Health struct {
	Uptime   float64    `json:"uptime"`   // seconds since the guest kernel booted (/proc/uptime)
	Hostname string     `json:"hostname"` // the guest's hostname
	Kernel   string     `json:"kernel"`   // the guest kernel's release (uname -r)
	Load     [3]float64 `json:"load"`     // the 1, 5 and 15 minute load averages (/proc/loadavg)
}

// Unique is what the host gives a box after a fork or a restore, so that boxes made from one snapshot share no
// RNG state, no stale clock and no identity. Zero fields are left as they are in the guest.
type Unique struct {
	Seed         []byte `json:"seed,omitempty"`           // entropy added to the guest kernel's RNG (base64 in JSON)
	TimeUnixNano int64  `json:"time_unix_nano,omitempty"` // the wall clock the guest steps to
	Hostname     string `json:"hostname,omitempty"`       // the guest's new hostname (and /etc/hostname)
	MachineID    string `json:"machine_id,omitempty"`     // the guest's new /etc/machine-id: 32 lower-case hex digits
	// Fork tells a fork's child which it is: a box fork waiting in the
	// guest returns with it, and the agent writes ForkFile.
	Fork *ForkInfo `json:"fork,omitempty"`
}

// seedSize is the entropy NewUnique draws: enough to reseed the kernel's ChaCha20 RNG (32 bytes) twice over.
const seedSize = 64

// maxSeedSize bounds the seed a guest accepts; the kernel takes at most a page per RNDADDENTROPY anyway.
const maxSeedSize = 4096

// NewUnique returns a Unique with fresh entropy, the host's clock now, hostname (may be empty) and a fresh
// random machine-id.
func NewUnique(hostname string) (Unique, error) {
	u := Unique{Seed: make([]byte, seedSize), Hostname: hostname}
	if _, err := rand.Read(u.Seed); err != nil {
		return Unique{}, fmt.Errorf("agent: unique: entropy: %w", err)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return Unique{}, fmt.Errorf("agent: unique: machine-id: %w", err)
	}
	u.MachineID = hex.EncodeToString(id)
	u.TimeUnixNano = time.Now().UnixNano()
	return u, nil
}

// Validate checks what the guest would refuse: a seed over 4 KiB, a negative time, a hostname that is not a valid
// host name, a machine-id that is not 32 lower-case hex digits. Errors wrap errdefs.ErrInvalidArgument.
func (u Unique) Validate() error {
	if len(u.Seed) > maxSeedSize {
		return invalid("seed of %d bytes is over the %d byte limit", len(u.Seed), maxSeedSize)
	}
	if u.TimeUnixNano < 0 {
		return invalid("time %d is before 1970", u.TimeUnixNano)
	}
	if u.Hostname != "" {
		if err := ValidateHostname(u.Hostname); err != nil {
			return err
		}
	}
	if u.MachineID != "" && !isMachineID(u.MachineID) {
		return invalid("machine-id %q is not 32 lower-case hex digits", u.MachineID)
	}
	if f := u.Fork; f != nil {
		if f.Count < 1 || f.Index < 1 || f.Index > f.Count {
			return invalid("fork child %d of %d", f.Index, f.Count)
		}
		for _, n := range []string{f.Parent, f.Name} {
			if err := ValidateHostname(n); err != nil {
				return err
			}
		}
	}
	return nil
}

// ValidateHostname checks that name is a valid host name: at most 64 bytes (the kernel's limit), made of labels of
// letters, digits and inner hyphens separated by dots. Errors wrap errdefs.ErrInvalidArgument.
func ValidateHostname(name string) error {
	if name == "" || len(name) > 64 {
		return invalid("hostname %q must have 1 to 64 characters", name)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || label[0] == '-' || label[len(label)-1] == '-' {
			return invalid("hostname %q has an empty label or a label that starts or ends with '-'", name)
		}
		for _, r := range label {
			if !isAlnum(r) && r != '-' {
				return invalid("hostname %q has the character %q; use letters, digits, '-' and '.'", name, r)
			}
		}
	}
	return nil
}

func isMachineID(s string) bool {
	if len(s) != 32 {
		return false
	}
	for _, r := range s {
		if !isLowerHex(r) {
			return false
		}
	}
	return true
}

func isAlnum(r rune) bool {
	return r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9'
}

func isLowerHex(r rune) bool {
	return r >= '0' && r <= '9' || r >= 'a' && r <= 'f'
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("agent: "+format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

// signalNumbers maps SSH signal names (RFC 4254 section 6.10, without "SIG") to Linux signal numbers. The guest is
// always Linux, so the numbers are Linux's whatever the host runs.
var signalNumbers = map[string]int{
	"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8, "KILL": 9, "USR1": 10,
	"SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20,
	"TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29,
	"PWR": 30, "SYS": 31,
}

// signalName returns the SSH name of Linux signal n, or "" if it has none.
func signalName(n int) string {
	for name, num := range signalNumbers {
		if num == n {
			return name
		}
	}
	return ""
}

// ExactSFTP is a subsystem the agent serves as the sftp one, but with no
// working folder: a relative path stays as it is. SFTP's servers join a
// symbolic link's relative target to their working folder, which would
// turn a link to "busybox" into one to "/root/busybox"; boxd copies trees
// into boxes with it (box.Manager.PutTree), links and all. Absolute paths
// only: other relative ones are the agent's own folder's.
const ExactSFTP = "sftp-exact@boxd.dev"
