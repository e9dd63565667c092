package uffd

import (
	"testing"
	"unsafe"
)

// The sizes of struct uffd_msg and the ioctl arguments in linux/userfaultfd.h,
// which are also encoded in the ioctl numbers.
func TestABISizes(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
		ioc  uintptr
	}{
		{"uffd_msg", unsafe.Sizeof(Msg{}), 32, 0},
		{"uffdio_api", unsafe.Sizeof(uffdioAPI{}), 24, iocAPI},
		{"uffdio_range", unsafe.Sizeof(uffdioRange{}), 16, iocWake},
		{"uffdio_register", unsafe.Sizeof(uffdioRegister{}), 32, iocRegister},
		{"uffdio_copy", unsafe.Sizeof(uffdioCopy{}), 40, iocCopy},
		{"uffdio_zeropage", unsafe.Sizeof(uffdioZeropage{}), 32, iocZeropage},
	}
	for _, tc := range tests {
		if tc.got != tc.want {
			t.Errorf("%s: %d bytes, want %d", tc.name, tc.got, tc.want)
		}
		if tc.ioc != 0 && (tc.ioc>>16)&0x3fff != tc.want {
			t.Errorf("%s: ioctl %#x encodes size %d, want %d", tc.name, tc.ioc, (tc.ioc>>16)&0x3fff, tc.want)
		}
	}
	if off := unsafe.Offsetof(Msg{}.Address); off != 16 {
		t.Errorf("uffd_msg.arg.pagefault.address at offset %d, want 16", off)
	}
}

func TestNew(t *testing.T) {
	fd, err := New()
	if err != nil {
		t.Fatalf("New: %v (userfaultfd needs root here: vm.unprivileged_userfaultfd=0)", err)
	}
	if fd.Features() == 0 {
		t.Errorf("no features reported")
	}
	if err := fd.Close(); err != nil {
		t.Fatal(err)
	}
	if err := fd.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
