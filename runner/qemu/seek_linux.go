package qemu

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// seekData returns the first offset at or after off that holds data, or -1
// when there is none.
func seekData(f *os.File, off int64) (int64, error) {
	n, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return -1, nil
	}
	if err != nil {
		return 0, fmt.Errorf("qemu: SEEK_DATA: %w", err)
	}
	return n, nil
}

// seekHole returns the first hole at or after off (the file's end counts).
func seekHole(f *os.File, off int64) (int64, error) {
	n, err := unix.Seek(int(f.Fd()), off, unix.SEEK_HOLE)
	if err != nil {
		return 0, fmt.Errorf("qemu: SEEK_HOLE: %w", err)
	}
	return n, nil
}

// punchHole gives the n bytes of f at off back to holes.
func punchHole(f *os.File, off, n int64) error {
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		return fmt.Errorf("qemu: punching a hole: %w", err)
	}
	return nil
}
