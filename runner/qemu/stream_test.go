package qemu

import (
	"bytes"
	"errors"
	"testing"
)

func TestStripRAMRejectsOtherStreams(t *testing.T) {
	for _, c := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"not QEVM", []byte("GARBAGE!")},
		{"truncated header", []byte{0x51, 0x45, 0x56, 0x4d, 0, 0}},
		{"unknown section", []byte{0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 0x42}},
		{"live section other than RAM", append([]byte{0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, vmSectionStart, 0, 0, 0, 1, 5}, "block"...)},
	} {
		t.Run(c.name, func(t *testing.T) {
			var out bytes.Buffer
			if _, err := stripRAM(bytes.NewReader(c.in), &out); !errors.Is(err, errStream) {
				t.Fatalf("stripRAM = %v, want errStream", err)
			}
		})
	}
}
