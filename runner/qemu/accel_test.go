package qemu

import "testing"

func TestHasVirtFlag(t *testing.T) {
	for _, c := range []struct {
		info string
		want bool
	}{
		{"processor\t: 0\nflags\t\t: fpu vme sse2 vmx lm\n", true},
		{"flags\t\t: fpu svm\n", true},
		{"flags\t\t: fpu sse2 lm hypervisor\n", false},
		{"vmx flags\t: ept\nflags\t\t: fpu\n", false}, // "vmx flags" names EPT features, not the vmx flag
		{"", false},
	} {
		if got := HasVirtFlag([]byte(c.info)); got != c.want {
			t.Errorf("HasVirtFlag(%q) = %v, want %v", c.info, got, c.want)
		}
	}
}
