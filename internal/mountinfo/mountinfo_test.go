package mountinfo

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		"/plain":           "/plain",
		`/a\040b`:          "/a b",
		`/tab\011x\134end`: "/tab\tx\\end",
		`/bad\09`:          `/bad\09`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestUnder(t *testing.T) {
	dir := t.TempDir()
	inner := filepath.Join(dir, "a b", "c")
	if err := os.MkdirAll(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, mp := range []string{filepath.Join(dir, "a b"), inner} {
		testutil.MountTmpfs(t, mp, "")
		if err := os.MkdirAll(inner, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Under(dir)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{inner, filepath.Join(dir, "a b")}; !slices.Equal(got, want) {
		t.Fatalf("Under = %q, want %q (deepest first)", got, want)
	}
	if got, _ := Under(dir + "x"); len(got) != 0 {
		t.Fatalf("a sibling's prefix matched: %q", got)
	}
}
