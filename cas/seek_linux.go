//go:build linux

package cas

import (
	"errors"
	"math"

	"golang.org/x/sys/unix"
)

// dataExtent finds the first run of data at or after off in the file fd,
// asking the file system with SEEK_DATA and SEEK_HOLE: [start, end) holds
// data, and everything from off up to start is a hole, which reads as zeros.
// Past the last data it returns start = end = math.MaxInt64. ok is false when
// the file system cannot tell; the caller must then read everything.
// Both calls move fd's offset.
func dataExtent(fd int, off int64) (start, end int64, ok bool) {
	start, err := unix.Seek(fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return math.MaxInt64, math.MaxInt64, true
	}
	if err != nil || start < off {
		return 0, 0, false
	}
	end, err = unix.Seek(fd, start, unix.SEEK_HOLE)
	if err != nil || end <= start {
		return 0, 0, false
	}
	return start, end, true
}
