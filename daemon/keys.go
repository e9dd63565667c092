package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/containerd/errdefs"
	"golang.org/x/crypto/ssh"
)

// KeysName is the file under boxd's root that holds the registered keys.
const KeysName = "registered_keys"

// RegisteredKey is a public key an operator registered (boxd keys add):
// its holder may run boxd's box commands over SSH (ssh boxd@host COMMAND)
// and sees only the boxes it made there.
type RegisteredKey struct {
	// Fingerprint is the key's SHA256 fingerprint ("SHA256:..."), which
	// its boxes record as their Owner.
	Fingerprint string `json:"fingerprint"`
	Type        string `json:"type"`
	// Key is the key in the authorized_keys format, without a comment.
	Key     string `json:"key"`
	Comment string `json:"comment,omitempty"`
	// Boxes is how many boxes the key owns (in GET /v1/keys).
	Boxes int `json:"boxes"`

	pub ssh.PublicKey
}

// KeyRegistry is the registered keys of a root, kept in ROOT/registered_keys
// in the authorized_keys format (one key a line, with its comment). Only
// the daemon, which owns the root, changes the file, and it replaces it
// whole (a new file renamed over the old one), so a crash leaves the old
// keys or the new ones.
type KeyRegistry struct {
	path string

	// mu protects keys and the file.
	mu   sync.Mutex
	keys []RegisteredKey
}

// OpenKeyRegistry reads the registered keys of the file at path; no file is
// no keys. A file that is not what the registry writes is an error naming
// its line.
func OpenKeyRegistry(path string) (*KeyRegistry, error) {
	r := &KeyRegistry{path: path}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("registered keys: %w", err)
	}
	if len(bytes.TrimSpace(stripComments(data))) == 0 {
		return r, nil
	}
	if r.keys, err = parseKeyLines(strings.Split(string(data), "\n")); err != nil {
		return nil, fmt.Errorf("registered keys %s: %w", path, err)
	}
	return r, nil
}

// stripComments drops the # lines of an authorized_keys file.
func stripComments(data []byte) []byte {
	var out []byte
	for line := range bytes.Lines(data) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line...)
		}
	}
	return out
}

// parseKeyLines parses authorized_keys lines into keys, keeping each
// line's comment. Its errors are sshproxy.ParseAuthorizedKeys's: one line,
// errdefs.ErrInvalidArgument. A key given twice is returned once.
func parseKeyLines(lines []string) ([]RegisteredKey, error) {
	lines = strings.Split(strings.Join(lines, "\n"), "\n")
	if _, err := sshproxy.ParseAuthorizedKeys([]byte(strings.Join(lines, "\n"))); err != nil {
		return nil, err
	}
	var keys []RegisteredKey
	seen := map[string]bool{}
	for _, line := range lines {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		pub, comment, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
		if err != nil {
			return nil, errcat.With(err, errdefs.ErrInvalidArgument) // ParseAuthorizedKeys took it
		}
		fp := ssh.FingerprintSHA256(pub)
		if seen[fp] {
			continue
		}
		seen[fp] = true
		keys = append(keys, RegisteredKey{
			Fingerprint: fp, Type: pub.Type(), Comment: strings.TrimSpace(comment),
			Key: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))), pub: pub,
		})
	}
	return keys, nil
}

// List returns the registered keys, in the order they were added.
func (r *KeyRegistry) List() []RegisteredKey {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]RegisteredKey{}, r.keys...)
}

// PublicKeys returns the registered keys as SSH public keys.
func (r *KeyRegistry) PublicKeys() []ssh.PublicKey {
	r.mu.Lock()
	defer r.mu.Unlock()
	pubs := make([]ssh.PublicKey, len(r.keys))
	for i, k := range r.keys {
		pubs[i] = k.pub
	}
	return pubs
}

// Lookup returns the registered key of fingerprint fp.
func (r *KeyRegistry) Lookup(fp string) (RegisteredKey, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range r.keys {
		if k.Fingerprint == fp {
			return k, true
		}
	}
	return RegisteredKey{}, false
}

// Add registers the keys of lines (authorized_keys lines; comments are
// kept) and returns them: all of them, or none when one is registered
// already (errdefs.ErrAlreadyExists) or a line is not a public key
// (errdefs.ErrInvalidArgument).
func (r *KeyRegistry) Add(lines []string) ([]RegisteredKey, error) {
	add, err := parseKeyLines(lines)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range add {
		for _, have := range r.keys {
			if have.Fingerprint == k.Fingerprint {
				return nil, fmt.Errorf("key %s is registered already: %w", k.Fingerprint, errdefs.ErrAlreadyExists)
			}
		}
	}
	keys := append(append([]RegisteredKey{}, r.keys...), add...)
	if err := r.write(keys); err != nil {
		return nil, err
	}
	r.keys = keys
	return add, nil
}

// Remove unregisters the key of fingerprint fp ("SHA256:..." or without
// the prefix) and returns it; an unknown one is errdefs.ErrNotFound.
func (r *KeyRegistry) Remove(fp string) (RegisteredKey, error) {
	fp = CanonicalFingerprint(fp)
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, k := range r.keys {
		if k.Fingerprint != fp {
			continue
		}
		keys := append(append([]RegisteredKey{}, r.keys[:i]...), r.keys[i+1:]...)
		if err := r.write(keys); err != nil {
			return RegisteredKey{}, err
		}
		r.keys = keys
		return k, nil
	}
	return RegisteredKey{}, fmt.Errorf("no registered key has fingerprint %s (boxd keys ls lists them): %w", fp, errdefs.ErrNotFound)
}

// CanonicalFingerprint returns fp with the "SHA256:" prefix that
// ssh.FingerprintSHA256 writes, which people may leave out.
func CanonicalFingerprint(fp string) string {
	if !strings.HasPrefix(fp, "SHA256:") {
		return "SHA256:" + fp
	}
	return fp
}

// write replaces the file with keys: a new file, synced, renamed over the
// old one, and the folder synced. Precondition: r.mu is held.
func (r *KeyRegistry) write(keys []RegisteredKey) error {
	var b strings.Builder
	b.WriteString("# The keys that may run boxd's box commands over SSH (ssh boxd@host COMMAND).\n")
	b.WriteString("# Written by the boxd daemon: change them with boxd keys add and boxd keys rm.\n")
	for _, k := range keys {
		b.WriteString(k.Key)
		if k.Comment != "" {
			b.WriteString(" " + k.Comment)
		}
		b.WriteString("\n")
	}
	dir := filepath.Dir(r.path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(r.path)+"-*")
	if err != nil {
		return fmt.Errorf("registered keys: %w", err)
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(b.String())
	if err == nil {
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), r.path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return fmt.Errorf("registered keys: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// KeysRequest is the body of POST /v1/keys: authorized_keys lines to
// register.
type KeysRequest struct {
	Keys []string `json:"keys"`
}

// ownerCreate makes req a box of the registered key owner: it admits that
// key alone, and it is made from an image.
func (s *Server) ownerCreate(owner string, req *CreateRequest) error {
	k, ok := s.keys.Lookup(owner)
	if !ok {
		return fmt.Errorf("key %s is not registered: %w", owner, errdefs.ErrPermissionDenied)
	}
	if len(req.Keys) > 0 {
		return fmt.Errorf("a box made for a registered key admits that key alone; give no keys: %w", errdefs.ErrInvalidArgument)
	}
	if req.From != "" {
		return fmt.Errorf("a box made for a registered key is made from an image, not from snapshot %s: %w", req.From, errdefs.ErrInvalidArgument)
	}
	req.Keys = []string{k.Key}
	return nil
}

// errNoKeys is the error of the keys routes on a server without a registry.
var errNoKeys = fmt.Errorf("this daemon keeps no registered keys: %w", errdefs.ErrNotImplemented)

func (s *Server) listKeys(w http.ResponseWriter, r *http.Request) {
	if s.keys == nil {
		s.fail(w, r, errNoKeys)
		return
	}
	boxes, err := s.mgr.List()
	if err != nil {
		s.fail(w, r, err)
		return
	}
	owned := map[string]int{}
	for _, bx := range boxes {
		owned[bx.Owner]++
	}
	keys := s.keys.List()
	for i := range keys {
		keys[i].Boxes = owned[keys[i].Fingerprint]
	}
	s.reply(w, keys)
}

func (s *Server) addKeys(w http.ResponseWriter, r *http.Request) {
	var req KeysRequest
	err := decode(w, r, maxRequestBody, &req)
	if err == nil && s.keys == nil {
		err = errNoKeys
	}
	var added []RegisteredKey
	if err == nil {
		added, err = s.keys.Add(req.Keys)
	}
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, added)
}

func (s *Server) removeKey(w http.ResponseWriter, r *http.Request) {
	if s.keys == nil {
		s.fail(w, r, errNoKeys)
		return
	}
	k, err := s.keys.Remove(r.PathValue("fingerprint"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	s.reply(w, k)
}

// Keys returns the registered keys, each with the number of boxes it owns.
func (c *Client) Keys(ctx context.Context) ([]RegisteredKey, error) {
	var out []RegisteredKey
	return out, c.do(ctx, http.MethodGet, "/v1/keys", nil, &out)
}

// AddKeys registers the keys of lines (authorized_keys lines) and returns
// them.
func (c *Client) AddKeys(ctx context.Context, lines []string) ([]RegisteredKey, error) {
	var out []RegisteredKey
	return out, c.do(ctx, http.MethodPost, "/v1/keys", KeysRequest{Keys: lines}, &out)
}

// RemoveKey unregisters the key of fingerprint fp and returns it.
func (c *Client) RemoveKey(ctx context.Context, fp string) (RegisteredKey, error) {
	var out RegisteredKey
	return out, c.do(ctx, http.MethodDelete, "/v1/keys/"+url.PathEscape(fp), nil, &out)
}
