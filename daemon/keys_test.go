package daemon

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// newKeyLine returns a new ed25519 public key as an authorized_keys line
// with comment, and its fingerprint.
func newKeyLine(t *testing.T, comment string) (string, string) {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k)))
	if comment != "" {
		line += " " + comment
	}
	return line, ssh.FingerprintSHA256(k)
}

func TestKeyRegistry(t *testing.T) {
	path := filepath.Join(t.TempDir(), KeysName)
	r, err := OpenKeyRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.List(); len(got) != 0 {
		t.Fatalf("a registry without a file: %v", got)
	}
	alice, aliceFP := newKeyLine(t, "alice@laptop")
	bob, bobFP := newKeyLine(t, "")
	carol, _ := newKeyLine(t, "carol")
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	block, _ := ssh.MarshalPrivateKey(priv, "")
	private := strings.Split(strings.TrimSpace(string(pem.EncodeToMemory(block))), "\n")

	added, err := r.Add([]string{alice, "# a comment", "", bob, alice})
	if err != nil {
		t.Fatal(err)
	}
	if len(added) != 2 || added[0].Fingerprint != aliceFP || added[0].Comment != "alice@laptop" || added[0].Type != "ssh-ed25519" ||
		added[1].Fingerprint != bobFP || added[1].Comment != "" || strings.Contains(added[0].Key, "alice") {
		t.Fatalf("Add: %+v", added)
	}

	// Every refusal is one line of its category, and changes nothing.
	for _, tc := range []struct {
		name  string
		lines []string
		cat   error
		want  string
	}{
		{"registered already", []string{carol, alice}, errdefs.ErrAlreadyExists, "key " + aliceFP + " is registered already"},
		{"not a key", []string{carol, "hello world"}, errdefs.ErrInvalidArgument, "line 2 is not an SSH public key"},
		{"no key", []string{"# nothing"}, errdefs.ErrInvalidArgument, "no SSH public key found"},
		{"private key", private, errdefs.ErrInvalidArgument, "line 1 starts a private key"},
		{"key options", []string{`command="ls" ` + carol}, errdefs.ErrInvalidArgument, "line 1 has key options"},
		{"two lines in one", []string{carol + "\nnot a key"}, errdefs.ErrInvalidArgument, "line 2 is not an SSH public key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := r.Add(tc.lines)
			if !errors.Is(err, tc.cat) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Add: %v, want one line of %v saying %q", err, tc.cat, tc.want)
			}
			if n := len(r.List()); n != 2 {
				t.Fatalf("a refused Add left %d keys, want 2", n)
			}
		})
	}

	if _, err := r.Remove("SHA256:nosuch"); !errors.Is(err, errdefs.ErrNotFound) || errcat.ExitCode(err) != 3 || !strings.Contains(err.Error(), "SHA256:nosuch") {
		t.Fatalf("Remove of an unknown key: %v", err)
	}
	// The prefix may be left out.
	if k, err := r.Remove(strings.TrimPrefix(bobFP, "SHA256:")); err != nil || k.Fingerprint != bobFP {
		t.Fatalf("Remove: %+v, %v", k, err)
	}
	if _, ok := r.Lookup(bobFP); ok {
		t.Fatal("a removed key is still registered")
	}

	// The file holds what the registry says, comments kept; a new registry
	// reads it back.
	again, err := OpenKeyRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	keys := again.List()
	if len(keys) != 1 || keys[0].Fingerprint != aliceFP || keys[0].Comment != "alice@laptop" || len(again.PublicKeys()) != 1 {
		t.Fatalf("reopened: %+v", keys)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("the file: %v, %v", st, err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Fatalf("files beside the registry: %v", entries)
	}

	// A damaged file stops the daemon rather than losing keys.
	if err := os.WriteFile(path, []byte(alice+"\ngarbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenKeyRegistry(path); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("a damaged file: %v", err)
	}
}
