package sshproxy

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

func TestLoadOrCreateHostKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "etc", "host_key") // the folder is created too
	first, err := LoadOrCreateHostKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if typ := first.PublicKey().Type(); typ != ssh.KeyAlgoED25519 {
		t.Errorf("key type %s, want ed25519", typ)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("mode %04o, want 0600", perm)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(data, []byte("-----BEGIN OPENSSH PRIVATE KEY-----\n")) {
		t.Errorf("key file is not in OpenSSH format:\n%s", data)
	}
	again, err := LoadOrCreateHostKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.PublicKey().Marshal(), first.PublicKey().Marshal()) {
		t.Error("the host key changed between calls")
	}
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Errorf("files left beside the key: %v", entries)
	}
}

// TestLoadOrCreateHostKeyRace checks that concurrent first calls agree on
// one key.
func TestLoadOrCreateHostKeyRace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "host_key")
	keys := make([][]byte, 8)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			s, err := LoadOrCreateHostKey(path)
			if err != nil {
				t.Error(err)
				return
			}
			keys[i] = s.PublicKey().Marshal()
		})
	}
	wg.Wait()
	for _, k := range keys[1:] {
		if !bytes.Equal(k, keys[0]) {
			t.Fatal("concurrent callers got different host keys")
		}
	}
}

func TestLoadHostKeyRefuses(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	if _, err := LoadOrCreateHostKey(good); err != nil {
		t.Fatal(err)
	}
	goodData, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		data    []byte
		mode    os.FileMode
		wantErr error
		want    string
	}{
		{"garbage", []byte("not a key\n"), 0o600, errdefs.ErrInvalidArgument, "is not an SSH private key"},
		{"public key", []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx0 test\n"), 0o600, errdefs.ErrInvalidArgument, "is not an SSH private key"},
		{"readable by others", goodData, 0o644, errdefs.ErrFailedPrecondition, "make it 0600"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tt.name, " ", "-"))
			if err := os.WriteFile(path, tt.data, tt.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil { // past the umask
				t.Fatal(err)
			}
			_, err := LoadOrCreateHostKey(path)
			if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want %v containing %q", err, tt.wantErr, tt.want)
			}
			if data, _ := os.ReadFile(path); !bytes.Equal(data, tt.data) {
				t.Error("the refused file was changed")
			}
		})
	}
	t.Run("directory", func(t *testing.T) {
		_, err := LoadOrCreateHostKey(t.TempDir())
		if !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("got %v, want invalid argument", err)
		}
	})
}
