package cas

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// ChunkSize is the size of every chunk: one disk block or one guest page.
const ChunkSize = 4096

// ID is the SHA-256 of a chunk's raw bytes.
type ID [sha256.Size]byte

// ZeroID is the id of the all-zero chunk, which is never stored.
var ZeroID = Sum(make([]byte, ChunkSize))

// Sum returns the id of a chunk. A chunk shorter than ChunkSize is hashed as
// if padded with zeros, so a file's tail block has the id it has on export.
func Sum(chunk []byte) ID {
	if len(chunk) == ChunkSize {
		return sha256.Sum256(chunk)
	}
	var full [ChunkSize]byte
	copy(full[:], chunk)
	return sha256.Sum256(full[:])
}

// String returns the id in go-digest form, "sha256:<hex>".
func (id ID) String() string { return "sha256:" + hex.EncodeToString(id[:]) }

// Short returns the first 12 hex digits, for logs and tables.
func (id ID) Short() string { return hex.EncodeToString(id[:6]) }

// Digest returns the id as a go-digest Digest.
func (id ID) Digest() digest.Digest { return digest.Digest(id.String()) }

// IsZero reports whether id names the all-zero chunk.
func (id ID) IsZero() bool { return id == ZeroID }

// MarshalText implements encoding.TextMarshaler in go-digest form.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *ID) UnmarshalText(b []byte) error {
	p, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = p
	return nil
}

// ParseID parses "sha256:<64 hex digits>" (or the bare hex digits).
func ParseID(s string) (ID, error) {
	var id ID
	hexPart := strings.TrimPrefix(s, "sha256:")
	if len(hexPart) != 2*len(id) {
		return id, fmt.Errorf("chunk id %q: want sha256:<64 hex digits>: %w", s, errdefs.ErrInvalidArgument)
	}
	if _, err := hex.Decode(id[:], []byte(hexPart)); err != nil {
		return id, fmt.Errorf("chunk id %q: %w: %w", s, err, errdefs.ErrInvalidArgument)
	}
	return id, nil
}

// isZeroChunk reports whether b holds only zero bytes.
func isZeroChunk(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
