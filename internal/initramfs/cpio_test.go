package initramfs

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// entry is one record read back from a newc archive.
type entry struct {
	name       string
	mode       uint32
	uid, gid   uint32
	nlink      uint32
	data       string
	rmaj, rmin uint32
	ino        uint32
}

// readNewc parses a newc archive strictly: every header and every data part must start on a 4-byte boundary,
// padding must be zeros, the archive must end right after the padded TRAILER!!! record.
func readNewc(t *testing.T, b []byte) []entry {
	t.Helper()
	var out []entry
	off := 0
	field := func(i int) uint32 {
		s := string(b[off+6+8*i : off+6+8*(i+1)])
		v, err := strconv.ParseUint(s, 16, 32)
		if err != nil {
			t.Fatalf("offset %d: field %d %q: %v", off, i, s, err)
		}
		return uint32(v)
	}
	zeros := func(from, to int) {
		for i := from; i < to; i++ {
			if b[i] != 0 {
				t.Fatalf("padding byte at %d is %#x", i, b[i])
			}
		}
	}
	for {
		if off%4 != 0 {
			t.Fatalf("header at %d is not 4-byte aligned", off)
		}
		if off+110 > len(b) {
			t.Fatalf("truncated header at %d (archive %d bytes)", off, len(b))
		}
		if magic := string(b[off : off+6]); magic != "070701" {
			t.Fatalf("offset %d: magic %q", off, magic)
		}
		e := entry{ino: field(0), mode: field(1), uid: field(2), gid: field(3), nlink: field(4), rmaj: field(9), rmin: field(10)}
		size, namesize := int(field(6)), int(field(11))
		if field(5) != 0 || field(12) != 0 {
			t.Fatalf("offset %d: mtime or check not zero", off)
		}
		nameEnd := off + 110 + namesize
		if b[nameEnd-1] != 0 {
			t.Fatalf("offset %d: name not NUL-terminated", off)
		}
		e.name = string(b[off+110 : nameEnd-1])
		dataStart := nameEnd + int(padLen(int64(nameEnd)))
		zeros(nameEnd, dataStart)
		dataEnd := dataStart + size
		e.data = string(b[dataStart:dataEnd])
		next := dataEnd + int(padLen(int64(dataEnd)))
		zeros(dataEnd, next)
		off = next
		out = append(out, e)
		if e.name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
	}
}

func TestWriterEntries(t *testing.T) {
	type add func(w *Writer) error
	tests := []struct {
		name string
		adds []add
		want []entry // without the trailer; ino is checked to be unique and non-zero instead
	}{
		{
			name: "empty archive is just the trailer",
		},
		{
			name: "directory, file, symlink, device",
			adds: []add{
				func(w *Writer) error { return w.Dir("/bin", 0o755) },
				func(w *Writer) error { return w.File("/bin/hello", 0o755, []byte("#!/bin/sh\necho hi\n")) },
				func(w *Writer) error { return w.Symlink("/bin/sh", "busybox") },
				func(w *Writer) error { return w.CharDev("dev/console", 0o600, 5, 1) },
			},
			want: []entry{
				{name: "bin", mode: 0o040755, nlink: 2},
				{name: "bin/hello", mode: 0o100755, nlink: 1, data: "#!/bin/sh\necho hi\n"},
				{name: "bin/sh", mode: 0o120777, nlink: 1, data: "busybox"},
				{name: "dev", mode: 0o040755, nlink: 2},
				{name: "dev/console", mode: 0o020600, nlink: 1, rmaj: 5, rmin: 1},
			},
		},
		{
			name: "missing parents are added outermost first",
			adds: []add{
				func(w *Writer) error { return w.File("lib/modules/6.1/a.ko", 0o644, []byte("x")) },
				func(w *Writer) error { return w.File("lib/modules/6.1/b.ko", 0o644, []byte("yy")) },
			},
			want: []entry{
				{name: "lib", mode: 0o040755, nlink: 2},
				{name: "lib/modules", mode: 0o040755, nlink: 2},
				{name: "lib/modules/6.1", mode: 0o040755, nlink: 2},
				{name: "lib/modules/6.1/a.ko", mode: 0o100644, nlink: 1, data: "x"},
				{name: "lib/modules/6.1/b.ko", mode: 0o100644, nlink: 1, data: "yy"},
			},
		},
		{
			name: "special permission bits",
			adds: []add{
				func(w *Writer) error { return w.Dir("tmp", 0o777|fs.ModeSticky) },
				func(w *Writer) error { return w.File("su", 0o755|fs.ModeSetuid, nil) },
			},
			want: []entry{
				{name: "tmp", mode: 0o041777, nlink: 2},
				{name: "su", mode: 0o104755, nlink: 1},
			},
		},
	}
	// Padding edge cases: header (110) + name + NUL lands on every residue mod 4, and so does the data.
	for nameLen := 1; nameLen <= 4; nameLen++ {
		for dataLen := 0; dataLen <= 5; dataLen++ {
			name := strings.Repeat("n", nameLen)
			data := strings.Repeat("d", dataLen)
			tests = append(tests, struct {
				name string
				adds []add
				want []entry
			}{
				name: fmt.Sprintf("padding name %d data %d", nameLen, dataLen),
				adds: []add{
					func(w *Writer) error { return w.File(name, 0o644, []byte(data)) },
					func(w *Writer) error { return w.Symlink(name+".l", data+"t") },
				},
				want: []entry{
					{name: name, mode: 0o100644, nlink: 1, data: data},
					{name: name + ".l", mode: 0o120777, nlink: 1, data: data + "t"},
				},
			})
		}
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, compressed := range []bool{false, true} {
				var buf bytes.Buffer
				w := NewWriter(&buf)
				if compressed {
					w = NewGzipWriter(&buf)
				}
				for _, a := range tt.adds {
					if err := a(w); err != nil {
						t.Fatal(err)
					}
				}
				if err := w.Close(); err != nil {
					t.Fatal(err)
				}
				raw := buf.Bytes()
				if compressed {
					zr, err := gzip.NewReader(&buf)
					if err != nil {
						t.Fatal(err)
					}
					if raw, err = io.ReadAll(zr); err != nil {
						t.Fatal(err)
					}
				}
				got := readNewc(t, raw)
				trailer := got[len(got)-1]
				if trailer != (entry{name: "TRAILER!!!", nlink: 1}) {
					t.Errorf("trailer = %+v", trailer)
				}
				got = got[:len(got)-1]
				seen := map[uint32]bool{}
				for i := range got {
					if got[i].ino == 0 || seen[got[i].ino] {
						t.Errorf("entry %q: inode %d zero or reused", got[i].name, got[i].ino)
					}
					seen[got[i].ino] = true
					got[i].ino = 0
				}
				if fmt.Sprint(got) != fmt.Sprint(tt.want) {
					t.Errorf("compressed=%v entries:\n got %+v\nwant %+v", compressed, got, tt.want)
				}
			}
		})
	}
}

func TestWriterRejects(t *testing.T) {
	tests := []struct {
		name string
		do   func(w *Writer) error
		want error
	}{
		{"empty name", func(w *Writer) error { return w.File("", 0o644, nil) }, errdefs.ErrInvalidArgument},
		{"root", func(w *Writer) error { return w.Dir("/", 0o755) }, errdefs.ErrInvalidArgument},
		{"trailer name", func(w *Writer) error { return w.File("TRAILER!!!", 0o644, nil) }, errdefs.ErrInvalidArgument},
		{"empty symlink target", func(w *Writer) error { return w.Symlink("a", "") }, errdefs.ErrInvalidArgument},
		{"duplicate", func(w *Writer) error {
			if err := w.File("a/b", 0o644, nil); err != nil {
				return err
			}
			return w.File("/a/./b", 0o644, nil)
		}, errdefs.ErrAlreadyExists},
		{"dir after implicit parent", func(w *Writer) error {
			if err := w.File("a/b", 0o644, nil); err != nil {
				return err
			}
			return w.Dir("a", 0o700)
		}, errdefs.ErrAlreadyExists},
		{"after close", func(w *Writer) error {
			if err := w.Close(); err != nil {
				return err
			}
			return w.File("a", 0o644, nil)
		}, ErrClosed},
		{"close twice", func(w *Writer) error {
			if err := w.Close(); err != nil {
				return err
			}
			return w.Close()
		}, ErrClosed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do(NewWriter(io.Discard))
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

// failWriter fails every write after the first n bytes.
type failWriter struct{ n int }

func (f *failWriter) Write(b []byte) (int, error) {
	if len(b) > f.n {
		n := f.n
		f.n = 0
		return n, errors.New("disk full")
	}
	f.n -= len(b)
	return len(b), nil
}

func TestWriterWriteErrorSticks(t *testing.T) {
	w := NewWriter(&failWriter{n: 120})
	if err := w.File("a", 0o644, []byte("data")); err != nil {
		t.Fatalf("first entry fits: %v", err)
	}
	if err := w.File("b", 0o644, []byte("data")); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("second entry: err = %v, want disk full", err)
	}
	if err := w.Close(); err == nil {
		t.Fatal("Close after a write error returned nil")
	}
}

// TestWriterCpioTool cross-checks the archive with GNU cpio when it is installed; readNewc above is the
// test that always runs.
func TestWriterCpioTool(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio is not installed; the archive is checked by readNewc in TestWriterEntries")
	}
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, err := range []error{
		w.File("bin/busybox", 0o755, []byte("abc")),
		w.Symlink("bin/sh", "busybox"),
		w.File("init", 0o755, []byte("#!/bin/sh\n")),
		w.Close(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(cpio, "-t", "--quiet")
	cmd.Stdin = &buf
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	if got, want := strings.Fields(string(out)), []string{"bin", "bin/busybox", "bin/sh", "init"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("cpio -t lists %v, want %v", got, want)
	}
}
