package cas

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestID(t *testing.T) {
	g := newGen(30)
	chunk := g.random(ChunkSize)
	tests := []struct {
		name  string
		chunk []byte
		want  ID
	}{
		{"random chunk", chunk, sha256.Sum256(chunk)},
		{"zero chunk", make([]byte, ChunkSize), ZeroID},
		{"empty is the zero chunk", nil, ZeroID},
		{"short zero chunk", make([]byte, 10), ZeroID},
		{"short chunk is padded", chunk[:100], sha256.Sum256(append(append([]byte(nil), chunk[:100]...), make([]byte, ChunkSize-100)...))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := Sum(tt.chunk)
			if id != tt.want {
				t.Fatalf("Sum = %s, want %s", id, tt.want)
			}
			s := id.String()
			if !strings.HasPrefix(s, "sha256:") || len(s) != 7+64 {
				t.Errorf("String() = %q", s)
			}
			if id.Short() != s[7:19] {
				t.Errorf("Short() = %q, want %q", id.Short(), s[7:19])
			}
			if string(id.Digest()) != s || id.Digest().Validate() != nil {
				t.Errorf("Digest() = %q", id.Digest())
			}
			if id.IsZero() != (tt.want == ZeroID) {
				t.Errorf("IsZero() = %v", id.IsZero())
			}
			for _, in := range []string{s, s[7:], strings.ToUpper(s[7:]), "sha256:" + strings.ToUpper(s[7:])} {
				p, err := ParseID(in)
				if err != nil || p != id {
					t.Errorf("ParseID(%q) = %s, %v", in, p, err)
				}
			}
			b, err := json.Marshal(id)
			if err != nil {
				t.Fatal(err)
			}
			var back ID
			if err := json.Unmarshal(b, &back); err != nil || back != id {
				t.Errorf("JSON round trip %s: %s, %v", b, back, err)
			}
		})
	}
	if ZeroID != sha256.Sum256(make([]byte, ChunkSize)) {
		t.Error("ZeroID is not the hash of a zero chunk")
	}
	if !isZeroChunk(make([]byte, ChunkSize)) || isZeroChunk(append(make([]byte, ChunkSize-1), 1)) || !isZeroChunk(make([]byte, 13)) || isZeroChunk([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 1}) {
		t.Error("isZeroChunk is wrong")
	}
}

func TestParseIDRejects(t *testing.T) {
	good := hex.EncodeToString(make([]byte, 32))
	tests := []struct {
		name string
		in   string
	}{
		{"empty", ""},
		{"prefix only", "sha256:"},
		{"short", "sha256:" + good[:63]},
		{"long", "sha256:" + good + "0"},
		{"non-hex", "sha256:" + good[:63] + "g"},
		{"other algorithm", "sha512:" + good},
		{"upper-case prefix", "SHA256:" + good},
		{"space", " sha256:" + good},
		{"double prefix", "sha256:sha256:" + good[:57]},
		{"128 hex digits", good + good},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := ParseID(tt.in)
			wantErrIs(t, err, errdefs.ErrInvalidArgument)
			if id != (ID{}) {
				t.Errorf("ParseID returned %s with its error", id)
			}
			var u ID
			wantErrIs(t, u.UnmarshalText([]byte(tt.in)), errdefs.ErrInvalidArgument)
			if u != (ID{}) {
				t.Error("UnmarshalText changed the id on error")
			}
		})
	}
}
