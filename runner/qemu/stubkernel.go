package qemu

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/containerd/errdefs"
)

// A restored machine's guest booted long ago: QEMU never hands it the kernel
// again, yet QEMU reads the whole file given with -kernel into memory of its
// own at start (to serve it over fw_cfg), about 14 MiB for Debian's, in every
// fork and resume. A restore is started on a stub instead: the kernel's
// real-mode header and setup code, which is what QEMU parses, and one sector
// of nothing where the kernel proper was. The machine's RAM blocks, ROMs and
// device state are those the real kernel gives, so the saved state loads.

// bzImage header fields (Documentation/arch/x86/boot.rst).
const (
	bootSetupSects = 0x1f1 // setup_sects: 512-byte sectors of setup code after the boot sector; 0 means 4
	bootMagicAt    = 0x202 // "HdrS"
	bootHeaderEnd  = 0x268 // the end of the header fields of boot protocol 2.15
)

// stubKernels are the stubs made, by the kernel file they stand for.
type stubKernels struct {
	mu    sync.Mutex
	stubs map[string]string // kernel file and its size and time → stub path
}

// restoreKernel returns the kernel file a restored machine starts with: a
// stub of kernel, made once in dir, or kernel itself where no stub can be
// made (a kernel that is no bzImage).
func (r *Runner) restoreKernel(kernel string) string {
	st, err := os.Stat(kernel)
	if err != nil {
		return kernel
	}
	key := fmt.Sprintf("%s\x00%d\x00%d", kernel, st.Size(), st.ModTime().UnixNano())
	r.stubs.mu.Lock()
	defer r.stubs.mu.Unlock()
	if p, ok := r.stubs.stubs[key]; ok {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	sum := sha256.Sum256([]byte(key))
	p := filepath.Join(r.dirOrTemp(), "kernel-stubs", hex.EncodeToString(sum[:12]))
	if err := writeStubKernel(kernel, p); err != nil {
		r.logger().Warn("qemu: restores start on the whole kernel", "kernel", kernel, "err", err)
		return kernel
	}
	if r.stubs.stubs == nil {
		r.stubs.stubs = map[string]string{}
	}
	r.stubs.stubs[key] = p
	return p
}

// writeStubKernel writes the stub of bzImage kernel to path, through a
// temporary file renamed into place.
func writeStubKernel(kernel, path string) error {
	f, err := os.Open(kernel)
	if err != nil {
		return fmt.Errorf("qemu: kernel: %w", err)
	}
	defer f.Close()
	header := make([]byte, bootHeaderEnd)
	if _, err := io.ReadFull(f, header); err != nil {
		return fmt.Errorf("qemu: kernel %s: its boot header: %w", kernel, err)
	}
	stub, err := stubKernel(header, f)
	if err != nil {
		return fmt.Errorf("qemu: kernel %s: %w", kernel, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("qemu: %w", err)
	}
	tmp := path + ".tmp" + strconv.Itoa(os.Getpid())
	if err := os.WriteFile(tmp, stub, 0o600); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("qemu: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("qemu: %w", err)
	}
	return nil
}

// stubKernel returns the stub of the bzImage whose first bootHeaderEnd bytes
// are header and whose file is at: its boot sector and setup code, and a
// sector of zeros.
func stubKernel(header []byte, at io.ReaderAt) ([]byte, error) {
	if len(header) < bootHeaderEnd || !bytes.Equal(header[bootMagicAt:bootMagicAt+4], []byte("HdrS")) {
		return nil, fmt.Errorf("not a bzImage (no HdrS header): %w", errdefs.ErrInvalidArgument)
	}
	sects := int(header[bootSetupSects])
	if sects == 0 {
		sects = 4
	}
	setup := (sects + 1) * 512
	stub := make([]byte, setup+512)
	if _, err := at.ReadAt(stub[:setup], 0); err != nil {
		return nil, fmt.Errorf("its setup code: %w", err)
	}
	return stub, nil
}
