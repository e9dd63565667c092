package testutil

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestLockedBuffer(t *testing.T) {
	var b LockedBuffer
	early := b.Seen("tick 3\n")
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				// One byte at a time, as a console writes.
				for _, c := range []byte(strings.Repeat("x", w) + "\n") {
					b.Write([]byte{c})
				}
			}
		}()
	}
	go func() {
		wg.Wait()
		for _, c := range []byte("tick 3\n") {
			b.Write([]byte{c})
		}
	}()
	b.WaitFor(t, "tick 3\n", 10*time.Second)
	select {
	case <-early:
	default:
		t.Fatal("a channel from Seen before the text came is still open after it came")
	}
	select {
	case <-b.Seen("tick 3"):
	default:
		t.Fatal("Seen of a text already there did not return a closed channel")
	}
	if n := strings.Count(b.String(), "\n"); n != 401 {
		t.Fatalf("%d lines, want 401", n)
	}
	if got := string(b.Bytes()); got != b.String() {
		t.Fatalf("Bytes %q, String %q", got, b.String())
	}
}

func TestSocketPair(t *testing.T) {
	a, b, err := SocketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	// Both ends write before either reads, which net.Pipe would not allow.
	if _, err := a.Write([]byte("from a")); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Write([]byte("from b")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "from a" {
		t.Fatalf("b read %q, %v", buf, err)
	}
	if _, err := io.ReadFull(a, buf); err != nil || string(buf) != "from b" {
		t.Fatalf("a read %q, %v", buf, err)
	}
}

func TestMountTmpfs(t *testing.T) {
	dir := t.TempDir()
	t.Run("mount", func(t *testing.T) {
		MountTmpfs(t, dir, "size=1m")
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if st.Type != unix.TMPFS_MAGIC || st.Blocks*uint64(st.Bsize) != 1<<20 {
			t.Fatalf("%s: file system %#x of %d bytes, want a 1 MiB tmpfs", dir, st.Type, st.Blocks*uint64(st.Bsize))
		}
		if err := os.WriteFile(filepath.Join(dir, "f"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	// The subtest's cleanup unmounted it: the file went with the tmpfs.
	if _, err := os.Stat(filepath.Join(dir, "f")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after the test: %v, want the tmpfs and its file gone", err)
	}
}

type closer struct{ closed *bool }

func (c closer) Close() error { *c.closed = true; return nil }

func TestOpenGraph(t *testing.T) {
	var closed bool
	root := t.TempDir()
	t.Run("open", func(t *testing.T) {
		var got string
		OpenGraph(t, root, func(r string) (closer, error) { got = r; return closer{&closed}, nil })
		if got != root || closed {
			t.Fatalf("opened %q (closed %v), want %q open", got, closed, root)
		}
	})
	if !closed {
		t.Fatal("the graph is still open after the test")
	}
}
