package guest

import (
	"os"
	"testing"
)

func TestBuild(t *testing.T) {
	path, err := Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() == 0 || fi.Size() > StackTop-Load {
		t.Fatalf("guest binary of %d bytes", fi.Size())
	}
}
