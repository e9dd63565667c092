//go:build linux

package cas

import "golang.org/x/sys/unix"

// startWriteback asks the kernel to begin writing the dirty pages of
// [off, off+n) of the file fd to disk, without waiting for it and without
// making anything durable: a later fsync still does that, with less left
// to write. An error is ignored, as the fsync will do all the work then.
func startWriteback(fd uintptr, off, n int64) {
	_ = unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
}
