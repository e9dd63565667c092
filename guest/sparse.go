package guest

import (
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// sparseReader reads a file from its start, producing the zeros of its
// holes itself rather than reading them: a fresh 4 GiB disk holds a few
// hundred MiB of data, and reading the rest through the file would fill the
// page cache with zero pages.
type sparseReader struct {
	f    *os.File
	size int64
	off  int64
	// [dataStart, dataEnd) is the extent of data at or after off, as the
	// file system last said; dataStart == size when none is left.
	dataStart, dataEnd int64
}

func newSparseReader(f *os.File) (*sparseReader, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	r := &sparseReader{f: f, size: fi.Size()}
	return r, r.findData()
}

// findData sets the data extent at or after off.
func (r *sparseReader) findData() error {
	start, err := unix.Seek(int(r.f.Fd()), r.off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		r.dataStart, r.dataEnd = r.size, r.size // only a hole is left
		return nil
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
		r.dataStart, r.dataEnd = r.off, r.size // no hole support: all data
		return nil
	}
	if err != nil {
		return err
	}
	end, err := unix.Seek(int(r.f.Fd()), start, unix.SEEK_HOLE)
	if err != nil {
		return err
	}
	r.dataStart, r.dataEnd = start, end
	return nil
}

func (r *sparseReader) Read(p []byte) (int, error) {
	if r.off >= r.size {
		return 0, io.EOF
	}
	if r.off >= r.dataEnd {
		if err := r.findData(); err != nil {
			return 0, err
		}
	}
	p = p[:min(int64(len(p)), r.size-r.off)]
	if r.off < r.dataStart {
		n := min(int64(len(p)), r.dataStart-r.off)
		clear(p[:n])
		r.off += n
		return int(n), nil
	}
	n, err := r.f.ReadAt(p[:min(int64(len(p)), r.dataEnd-r.off)], r.off)
	r.off += int64(n)
	if errors.Is(err, io.EOF) && r.off < r.size {
		err = io.ErrUnexpectedEOF // the file shrank under us
	}
	return n, err
}
