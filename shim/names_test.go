package shim

import (
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/box"
)

func TestBoxName(t *testing.T) {
	cases := []struct{ ns, id, prefix string }{
		{"default", "web-1", "ctr-default-web-1-"},
		{"k8s.io", "0123ABCDEF", "ctr-k8s-io-0123abcdef-"},
		{"default", "--x__y--", "ctr-default-x-y-"},
		{"a", strings.Repeat("long", 40), "ctr-a-longlong"},
		{"", "", "ctr-"},
	}
	seen := map[string]bool{}
	for _, c := range cases {
		name := BoxName(c.ns, c.id)
		if err := box.ValidateName(name); err != nil {
			t.Errorf("BoxName(%q, %q) = %q: %v", c.ns, c.id, name, err)
		}
		if !strings.HasPrefix(name, c.prefix) {
			t.Errorf("BoxName(%q, %q) = %q, want it to begin %q", c.ns, c.id, name, c.prefix)
		}
		if seen[name] {
			t.Errorf("BoxName(%q, %q) = %q twice", c.ns, c.id, name)
		}
		seen[name] = true
	}
	// The same readable part, different containers: different boxes.
	if BoxName("a-b", "c") == BoxName("a", "b-c") {
		t.Error("containers a-b/c and a/b-c share a box")
	}
}
