package qemu

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestCopySparse copies a file with data runs between holes, in the kernel and through a buffer, on tmpfs and on
// the test's folder, and checks the copy holds the same bytes with the holes left holes.
func TestCopySparse(t *testing.T) {
	const size = 8 << 20
	runs := []struct{ off, n int64 }{{0, 64 << 10}, {1 << 20, 4 << 10}, {5<<20 + 12<<10, size - (5<<20 + 12<<10)}}
	dirs := map[string]string{"test folder": t.TempDir()}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		shm, err := os.MkdirTemp("/dev/shm", "boxd-test-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(shm) })
		dirs["tmpfs"] = shm
	}
	for dirName, dir := range dirs {
		for _, buffered := range []bool{false, true} {
			t.Run(dirName+map[bool]string{false: ", in the kernel", true: ", through a buffer"}[buffered], func(t *testing.T) {
				if buffered {
					kernelCopy = func(_, _ *os.File, _, _ int64) (int64, error) { return 0, errNoCopyRange }
					t.Cleanup(func() { kernelCopy = copyRange })
				}
				from := filepath.Join(dir, "from")
				want := make([]byte, size)
				f, err := os.Create(from)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.Truncate(size); err != nil {
					t.Fatal(err)
				}
				for i, r := range runs {
					data := bytes.Repeat([]byte{byte(i + 1), 0x5a, byte(r.off)}, int(r.n/3)+1)[:r.n]
					copy(want[r.off:], data)
					if _, err := f.WriteAt(data, r.off); err != nil {
						t.Fatal(err)
					}
				}
				_ = f.Close()
				out, err := os.Create(filepath.Join(dir, "to"))
				if err != nil {
					t.Fatal(err)
				}
				defer out.Close()
				if err := out.Truncate(size); err != nil {
					t.Fatal(err)
				}
				if err := copySparse(from, out, size); err != nil {
					t.Fatal(err)
				}
				got, err := os.ReadFile(out.Name())
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatal("the copy holds other bytes")
				}
				// The hole after the first run stays one (where the file system keeps holes at all).
				if next, err := seekData(out, 64<<10); err == nil && next >= 0 && next < 1<<20 && dirName == "tmpfs" {
					t.Errorf("the copy has data at %d, in the hole from 64 KiB to 1 MiB", next)
				}
			})
		}
	}
}
