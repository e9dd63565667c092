package cli

import (
	"strings"
	"testing"
)

func TestTermFilter(t *testing.T) {
	long := "\x1b[" + strings.Repeat("1;", 40) + "m"
	for _, tc := range []struct {
		name, in, want string
	}{
		{"text", "boxd-agent: ready\r\n", "boxd-agent: ready\r\n"},
		{"tabs and UTF-8", "a\tb é ✓\n", "a\tb é ✓\n"},
		{"the firmware's screen reset", "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\nBooting from ROM..\x1bc\x1b[?7l\x1b[2Jboxd-agent: ready\r\n",
			"\x1b[0mSeaBIOS\r\nBooting from ROM..boxd-agent: ready\r\n"},
		{"colours", "\x1b[1;31mred\x1b[m \x1b[38:5:208mo\x1b[0m\n", "\x1b[1;31mred\x1b[m \x1b[38:5:208mo\x1b[0m\n"},
		{"cursor moves", "a\x1b[10;1Hb\x1b[Kc\x1b[?25l\n", "abc\n"},
		{"private SGR", "\x1b[>4;2mx\n", "x\n"},
		{"too long", long + "x\n", "x\n"},
		{"a title", "\x1b]0;title\x07a\x1b]2;other\x1b\\b\n", "ab\n"},
		{"charset", "\x1b(Bx\x1b)0y\n", "xy\n"},
		{"controls", "a\x07b\x08c\x00d\x7fe\x0ef\n", "abcdef\n"},
		{"an unended sequence", "a\x1b[12", "a"},
		{"a control in a sequence", "a\x1b[1\nb", "ab"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var whole strings.Builder
			if n, err := (&termFilter{w: &whole}).Write([]byte(tc.in)); err != nil || n != len(tc.in) {
				t.Fatalf("Write: %d, %v", n, err)
			}
			if whole.String() != tc.want {
				t.Errorf("%q: %q, want %q", tc.in, whole.String(), tc.want)
			}
			// The same a byte at a time: sequences split across writes.
			var bytewise strings.Builder
			f := &termFilter{w: &bytewise}
			for i := range len(tc.in) {
				if _, err := f.Write([]byte{tc.in[i]}); err != nil {
					t.Fatal(err)
				}
			}
			if bytewise.String() != tc.want {
				t.Errorf("%q a byte at a time: %q, want %q", tc.in, bytewise.String(), tc.want)
			}
		})
	}
}
