package testutil

import (
	"io"
	"testing"
)

// OpenGraph opens the snapshot graph at root with open (snapshotter.Open,
// passed in so that the tests of the packages snapshotter imports may use
// this one too) and closes it when the test ends, failing t if it cannot
// open it.
func OpenGraph[G io.Closer](t testing.TB, root string, open func(root string) (G, error)) G {
	t.Helper()
	g, err := open(root)
	if err != nil {
		t.Fatalf("opening the graph at %s: %v", root, err)
	}
	t.Cleanup(func() { _ = g.Close() })
	return g
}
