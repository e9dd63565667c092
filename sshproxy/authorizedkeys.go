package sshproxy

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// ParseAuthorizedKeys parses public keys in the authorized_keys format (one
// key a line, as in a .pub file; blank lines and # comments are skipped).
// Unlike ssh.ParseAuthorizedKey it skips nothing it cannot read: a line that
// is not a public key, a private key, a certificate or a line with key
// options (command=, from=, ...), which boxd would not enforce, ends in an
// error that names the line and matches errdefs.ErrInvalidArgument. Input
// without any key is an error too. Duplicate keys are returned once.
func ParseAuthorizedKeys(data []byte) ([]ssh.PublicKey, error) {
	var keys []ssh.PublicKey
	seen := map[string]bool{}
	for i, line := range bytes.Split(data, []byte("\n")) {
		n := i + 1
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		if bytes.HasPrefix(line, []byte("-----BEGIN")) {
			return nil, invalid("line %d starts a private key; give the public key (the .pub file) instead", n)
		}
		key, _, options, _, err := ssh.ParseAuthorizedKey(line)
		if err != nil {
			return nil, invalid("line %d is not an SSH public key (want a line like \"ssh-ed25519 AAAA... comment\")", n)
		}
		if len(options) > 0 {
			return nil, invalid("line %d has key options (%s), which boxd does not support", n, strings.Join(options, ","))
		}
		if _, ok := key.(*ssh.Certificate); ok {
			return nil, invalid("line %d is an SSH certificate, not a public key", n)
		}
		if blob := string(key.Marshal()); !seen[blob] {
			seen[blob] = true
			keys = append(keys, key)
		}
	}
	if len(keys) == 0 {
		return nil, invalid("no SSH public key found (want lines like \"ssh-ed25519 AAAA... comment\")")
	}
	return keys, nil
}

func invalid(format string, args ...any) error {
	return errcat.With(fmt.Errorf(format, args...), errdefs.ErrInvalidArgument)
}
