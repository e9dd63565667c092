package guest

import (
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
)

// fakeModules writes a module tree under dir: one NAME.ko per entry of
// deps, NAME → its comma-separated depends=.
func fakeModules(t *testing.T, dir string, deps map[string]string) {
	t.Helper()
	for name, dep := range deps {
		testutil.WriteELF(t, filepath.Join(dir, "kernel", strings.ReplaceAll(name, "_", "-")+".ko"), "license=GPL", "depends="+dep, "name="+name)
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// cpioEntry is one record of a newc archive.
type cpioEntry struct {
	name         string
	mode         uint32
	rmajor       uint32
	rminor       uint32
	data         []byte
	uid, gid     uint32
	nlink, mtime uint32
}

// readInitramfs reads back a gzip newc archive, in order, without its
// trailer.
func readInitramfs(t *testing.T, path string) []cpioEntry {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	zr, err := gzip.NewReader(f)
	must(t, err)
	raw, err := io.ReadAll(zr)
	must(t, err)
	var out []cpioEntry
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(raw) || string(raw[off:off+6]) != "070701" {
			t.Fatalf("bad newc header at %d", off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(raw[off+6+8*i:off+14+8*i]), 16, 32)
			must(t, err)
			return uint32(v)
		}
		e := cpioEntry{mode: field(1), uid: field(2), gid: field(3), nlink: field(4), mtime: field(5), rmajor: field(9), rminor: field(10)}
		size, namesize := int(field(6)), int(field(11))
		e.name = string(raw[off+110 : off+110+namesize-1])
		data := align(off + 110 + namesize)
		e.data = raw[data : data+size]
		off = align(data + size)
		if e.name == "TRAILER!!!" {
			return out
		}
		out = append(out, e)
	}
}
