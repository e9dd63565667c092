package qemu

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
)

func TestStubKernel(t *testing.T) {
	// bzImage makes a kernel file of size bytes whose setup_sects is sects.
	bzImage := func(sects byte, size int) []byte {
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(i*7 + 1)
		}
		b[bootSetupSects] = sects
		copy(b[bootMagicAt:], "HdrS")
		return b
	}
	tests := []struct {
		name   string
		kernel []byte
		setup  int // bytes of the kernel the stub keeps; 0: no stub
	}{
		{name: "setup of 27 sectors", kernel: bzImage(27, 64<<10), setup: 28 * 512},
		{name: "setup_sects 0 means 4", kernel: bzImage(0, 64<<10), setup: 5 * 512},
		{name: "no HdrS", kernel: make([]byte, 64<<10)},
		{name: "shorter than its header", kernel: bzImage(27, 64<<10)[:bootHeaderEnd-1]},
		{name: "shorter than its setup", kernel: bzImage(27, 4096)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			kernel, stub := filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "stubs", "k")
			if err := os.WriteFile(kernel, tt.kernel, 0o600); err != nil {
				t.Fatal(err)
			}
			err := writeStubKernel(kernel, stub)
			if tt.setup == 0 {
				if err == nil {
					t.Fatal("a stub was made of a kernel that cannot have one")
				}
				if _, serr := os.Stat(stub); serr == nil {
					t.Fatal("a failed stub left a file")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(stub)
			if err != nil {
				t.Fatal(err)
			}
			want := append(bytes.Clone(tt.kernel[:tt.setup]), make([]byte, 512)...)
			if !bytes.Equal(got, want) {
				t.Fatalf("the stub has %d bytes, want the %d of the setup and a sector of zeros", len(got), tt.setup)
			}
		})
	}
	if _, err := stubKernel(make([]byte, 16), nil); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("a short header: %v, want errdefs.ErrInvalidArgument", err)
	}
}

func TestRestoreKernelFallsBack(t *testing.T) {
	r := &Runner{Dir: t.TempDir()}
	kernel := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(kernel, []byte("#!/bin/sh\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := r.restoreKernel(kernel); got != kernel {
		t.Fatalf("restoreKernel of a file that is no bzImage: %s, want the file itself", got)
	}
}
