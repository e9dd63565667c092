package cli

import (
	"archive/tar"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// entry is one tar entry: a file with body, a folder (name ends in /), or
// a link to linkname.
type entry struct {
	name, body, link string
	kind             byte
}

func archive(t *testing.T, entries ...entry) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Mode: 0o644, Typeflag: e.kind, Linkname: e.link, Size: int64(len(e.body))}
		if e.kind == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf
}

func TestUnpackTar(t *testing.T) {
	t.Run("file", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "a", "report.txt")
		if err := unpackTar(archive(t, entry{name: "r.txt", body: "hello"}), "r.txt", dest); err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(dest); err != nil || string(b) != "hello" {
			t.Fatalf("%q, %v", b, err)
		}
	})
	t.Run("folder", func(t *testing.T) {
		dest := filepath.Join(t.TempDir(), "out")
		err := unpackTar(archive(t,
			entry{name: "d/", kind: tar.TypeDir},
			entry{name: "d/sub/", kind: tar.TypeDir},
			entry{name: "d/sub/f", body: "deep"},
			entry{name: "d/link", kind: tar.TypeSymlink, link: "/etc/passwd"},
			entry{name: "d/hard", kind: tar.TypeLink, link: "d/sub/f"},
		), "d", dest)
		if err != nil {
			t.Fatal(err)
		}
		if b, err := os.ReadFile(filepath.Join(dest, "sub", "f")); err != nil || string(b) != "deep" {
			t.Fatalf("%q, %v", b, err)
		}
		for _, n := range []string{"link", "hard"} {
			if _, err := os.Lstat(filepath.Join(dest, n)); err == nil {
				t.Errorf("%s was unpacked", n)
			}
		}
	})
	for _, tc := range []struct {
		name    string
		entries []entry
		want    string
	}{
		{"dot-dot", []entry{{name: "d/../../escape", body: "x"}}, "outside d"},
		{"absolute", []entry{{name: "/etc/escape", body: "x"}}, "outside d"},
		{"another name", []entry{{name: "e/f", body: "x"}}, "outside d"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			err := unpackTar(archive(t, tc.entries...), "d", filepath.Join(dir, "out"))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escape")); err == nil {
				t.Fatal("a file was written outside the destination")
			}
		})
	}
	t.Run("through a symbolic link on the host", func(t *testing.T) {
		dir := t.TempDir()
		outside := filepath.Join(dir, "outside")
		if err := os.Mkdir(outside, 0o755); err != nil {
			t.Fatal(err)
		}
		dest := filepath.Join(dir, "out")
		if err := os.MkdirAll(dest, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, filepath.Join(dest, "sub")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(outside, "target"), filepath.Join(dest, "f")); err != nil {
			t.Fatal(err)
		}
		err := unpackTar(archive(t, entry{name: "d/sub/x", body: "x"}), "d", dest)
		if err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("a file through a linked folder: %v", err)
		}
		if err := unpackTar(archive(t, entry{name: "d/f", body: "x"}), "d", dest); err == nil {
			t.Error("a file written through a symbolic link")
		}
		if left, _ := os.ReadDir(outside); len(left) != 0 {
			t.Errorf("written outside: %v", left)
		}
	})
}

func TestPrefixWriter(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	p := &prefixWriter{mu: &mu, w: &out, prefix: "a | "}
	_, _ = p.Write([]byte("one\ntw"))
	_, _ = p.Write([]byte("o\nthree"))
	p.Flush()
	if out.String() != "a | one\na | two\na | three\n" {
		t.Fatalf("%q", out.String())
	}
}

func TestDefaultRunPrefix(t *testing.T) {
	long := strings.Repeat("w", 63)
	for _, warm := range []string{"warm", long, strings.Repeat("a", 50) + "-" + strings.Repeat("b", 12)} {
		p := defaultRunPrefix(warm, 256)
		if len(p+"-256") > 63 || strings.Contains(p, "--") || !strings.Contains(p, "-run-") {
			t.Errorf("prefix for %q: %q", warm, p)
		}
	}
}
