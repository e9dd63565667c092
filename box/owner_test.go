package box_test

import (
	"context"
	"testing"

	"github.com/boxd-dev/boxd/box"
)

// TestFakeOwner checks that a box keeps the owner it was made with and
// that its forks, and theirs, have the same one.
func TestFakeOwner(t *testing.T) {
	e := newFakeEnv(t, true)
	ctx := context.Background()
	const owner = "SHA256:owner"
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: fakeImage, Keys: []string{keyA}, Owner: owner}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Fork(ctx, "dev", []string{"a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Fork(ctx, "a", []string{"b"}); err != nil {
		t.Fatal(err)
	}
	e.create(t, "host")
	for name, want := range map[string]string{"dev": owner, "a": owner, "b": owner, "host": ""} {
		if got := e.state(t, name).Owner; got != want {
			t.Errorf("box %s: owner %q, want %q", name, got, want)
		}
	}
}
