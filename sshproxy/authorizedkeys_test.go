package sshproxy

import (
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

const (
	testPubA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
	testPubB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGB3Vr6vQ1vHn2b8CDfXx7qU4NUpJ+CYWPTvnrPf4XJt"
)

func TestParseAuthorizedKeys(t *testing.T) {
	tests := []struct {
		name string
		in   string
		keys int    // keys wanted when want is ""
		want string // part of the error wanted
	}{
		{name: "one .pub", in: testPubA + "\n", keys: 1},
		{name: "no final newline", in: testPubA, keys: 1},
		{name: "comments and blanks", in: "# mine\n\n" + testPubA + "\r\n  \n# more\n" + testPubB + "\n", keys: 2},
		{name: "duplicates", in: testPubA + "\n" + testPubA + "\n", keys: 1},
		{name: "empty", in: "", want: "no SSH public key found"},
		{name: "only comments", in: "# nothing\n", want: "no SSH public key found"},
		{name: "garbage line", in: testPubA + "\nhello world\n", want: "line 2 is not an SSH public key"},
		{name: "truncated key", in: testPubA[:40] + "\n", want: "line 1 is not an SSH public key"},
		{name: "private key", in: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n", want: "line 1 starts a private key"},
		{name: "options", in: `command="echo hi",no-pty ` + testPubA + "\n", want: `line 1 has key options (command="echo hi",no-pty)`},
		{name: "one option", in: "restrict " + testPubA + "\n", want: "line 1 has key options (restrict)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseAuthorizedKeys([]byte(tt.in))
			if tt.want != "" {
				if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), tt.want) {
					t.Errorf("got %v, want invalid argument containing %q", err, tt.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(keys) != tt.keys {
				t.Errorf("%d keys, want %d", len(keys), tt.keys)
			}
		})
	}
}

func TestParseAuthorizedKeysRefusesCertificates(t *testing.T) {
	ca, user := newTestKey(t), newTestKey(t)
	cert := &ssh.Certificate{Key: user.pub, CertType: ssh.UserCert, ValidPrincipals: []string{"dev"}, ValidBefore: ssh.CertTimeInfinity}
	if err := cert.SignCert(rand.Reader, ca.signer); err != nil {
		t.Fatal(err)
	}
	_, err := ParseAuthorizedKeys(ssh.MarshalAuthorizedKey(cert))
	if !errors.Is(err, errdefs.ErrInvalidArgument) || !strings.Contains(err.Error(), "is an SSH certificate") {
		t.Errorf("got %v, want a refused certificate", err)
	}
}

func FuzzParseAuthorizedKeys(f *testing.F) {
	f.Add([]byte(testPubA + "\n" + testPubB))
	f.Add([]byte("# c\n\nrestrict " + testPubA))
	f.Add([]byte("ssh-rsa AAAA\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := ParseAuthorizedKeys(data)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Fatalf("error %v is not invalid argument", err)
			}
			return
		}
		if len(keys) == 0 {
			t.Fatal("no keys and no error")
		}
		for _, k := range keys {
			if _, err := ssh.ParsePublicKey(k.Marshal()); err != nil {
				t.Fatalf("returned key does not round-trip: %v", err)
			}
		}
	})
}
