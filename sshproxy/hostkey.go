package sshproxy

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// LoadOrCreateHostKey returns the proxy's host key kept at path, creating it
// on first use: an ed25519 key in OpenSSH's private key format, mode 0600.
// Creation is atomic (the key is written to a temporary file, synced, and
// linked into place), so concurrent callers and crashes never leave a partial
// key, and every caller ends up with the one key that won. Like sshd, it
// refuses a key file that others can read or write.
func LoadOrCreateHostKey(path string) (ssh.Signer, error) {
	signer, err := loadHostKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return signer, err
	}
	if err := createHostKey(path); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, err
	}
	return loadHostKey(path)
}

func loadHostKey(path string) (ssh.Signer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fsCategory(fmt.Errorf("open host key: %w", err))
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fsCategory(fmt.Errorf("stat host key: %w", err))
	}
	if !fi.Mode().IsRegular() {
		return nil, errcat.With(fmt.Errorf("host key %s is not a regular file", path), errdefs.ErrInvalidArgument)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, errcat.With(fmt.Errorf("host key %s is accessible by others (mode %04o); make it 0600", path, perm),
			errdefs.ErrFailedPrecondition)
	}
	// A host key is a few hundred bytes; a large file is the wrong file.
	data, err := io.ReadAll(io.LimitReader(f, 1<<16))
	if err != nil {
		return nil, fsCategory(fmt.Errorf("read host key: %w", err))
	}
	signer, err := ssh.ParsePrivateKey(data)
	if err != nil {
		var missing *ssh.PassphraseMissingError
		if errors.As(err, &missing) {
			return nil, errcat.With(fmt.Errorf("host key %s is encrypted with a passphrase, which boxd cannot use", path),
				errdefs.ErrInvalidArgument)
		}
		return nil, errcat.With(fmt.Errorf("host key %s is not an SSH private key: %w", path, err), errdefs.ErrInvalidArgument)
	}
	return signer, nil
}

// createHostKey writes a new key to path unless a file is already there
// (then it returns an error matching fs.ErrExist).
func createHostKey(path string) (err error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate host key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "boxd host key")
	if err != nil {
		return fmt.Errorf("encode host key: %w", err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fsCategory(fmt.Errorf("create host key directory: %w", err))
	}
	tmp, err := os.CreateTemp(dir, ".hostkey-*") // mode 0600
	if err != nil {
		return fsCategory(fmt.Errorf("create host key: %w", err))
	}
	defer func() {
		_ = tmp.Close()
		_ = os.Remove(tmp.Name())
	}()
	if _, err := tmp.Write(pem.EncodeToMemory(block)); err != nil {
		return fsCategory(fmt.Errorf("write host key: %w", err))
	}
	if err := tmp.Sync(); err != nil {
		return fsCategory(fmt.Errorf("write host key: %w", err))
	}
	// Link, unlike rename, refuses to replace a key another process created
	// meanwhile: the first key linked is the host key for good.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return err
		}
		return fsCategory(fmt.Errorf("install host key: %w", err))
	}
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		_ = d.Close()
		if err != nil {
			return fsCategory(fmt.Errorf("sync host key directory: %w", err))
		}
	}
	return nil
}
