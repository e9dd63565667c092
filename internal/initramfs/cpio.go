// Package initramfs writes Linux initramfs images: newc cpio archives, gzip-compressed, with kernel modules in
// dependency order.
//
// A boxd guest boots the Debian cloud kernel with an initramfs that boxd builds itself (guest.Initramfs): the
// static boxd-agent as /init and the virtio drivers, which that kernel ships as modules. Writer produces the
// archive; LoadOrder says in which order the modules must be loaded.
package initramfs

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/containerd/errdefs"
)

// newc format constants (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst).
const (
	newcMagic     = "070701"
	newcHeaderLen = 110
	trailerName   = "TRAILER!!!"

	modeDir     = 0o040000
	modeRegular = 0o100000
	modeSymlink = 0o120000
	modeCharDev = 0o020000
)

// ErrClosed is returned by a Writer's methods after Close.
var ErrClosed = errors.New("initramfs: writer closed")

// Writer writes a newc cpio archive. Every entry is owned by uid and gid 0 and has mtime 0, so the same calls
// give the same bytes. Parent directories that were not added explicitly are added with mode 0755 before the
// first entry below them. A Writer is not safe for concurrent use.
type Writer struct {
	out   io.Writer    // where the cpio bytes go: the caller's writer, or gz
	gz    *gzip.Writer // nil for a plain archive
	n     int64        // cpio bytes written so far, for padding
	ino   uint32
	names map[string]bool // every entry written, by cleaned name
	err   error           // sticky: the first write error
	done  bool
}

// NewWriter returns a Writer that writes an uncompressed newc archive to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{out: w, names: map[string]bool{}}
}

// NewGzipWriter returns a Writer that writes a gzip-compressed newc archive to w, the form the kernel's
// initrd= loader and QEMU's -initrd take.
func NewGzipWriter(w io.Writer) *Writer {
	gz, _ := gzip.NewWriterLevel(w, gzip.BestCompression) // the level is valid, so no error
	return &Writer{out: gz, gz: gz, names: map[string]bool{}}
}

// Dir adds a directory. Only mode's permission bits (and setuid, setgid, sticky) are used.
func (w *Writer) Dir(name string, mode fs.FileMode) error {
	return w.entry(name, modeDir|unixPerm(mode), 2, nil, 0, 0)
}

// File adds a regular file with the given contents.
func (w *Writer) File(name string, mode fs.FileMode, data []byte) error {
	return w.entry(name, modeRegular|unixPerm(mode), 1, data, 0, 0)
}

// CopyFile adds a regular file whose contents are read from the host file src.
func (w *Writer) CopyFile(name string, mode fs.FileMode, src string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	return w.File(name, mode, data)
}

// Symlink adds a symbolic link name pointing to target (stored as given, relative or absolute).
func (w *Writer) Symlink(name, target string) error {
	if target == "" {
		return fmt.Errorf("initramfs: symlink %q: empty target: %w", name, errdefs.ErrInvalidArgument)
	}
	return w.entry(name, modeSymlink|0o777, 1, []byte(target), 0, 0)
}

// CharDev adds a character device node, such as /dev/console (5, 1).
func (w *Writer) CharDev(name string, mode fs.FileMode, major, minor uint32) error {
	return w.entry(name, modeCharDev|unixPerm(mode), 1, nil, major, minor)
}

// Close writes the TRAILER!!! entry and, for a gzip Writer, flushes and closes the gzip stream. It does not
// close the underlying writer. Calling Close twice returns ErrClosed.
func (w *Writer) Close() error {
	if w.done {
		return ErrClosed
	}
	w.writeRecord(trailerName, 0, 0, 1, nil, 0, 0)
	w.done = true
	if w.gz != nil {
		if err := w.gz.Close(); err != nil && w.err == nil {
			w.err = fmt.Errorf("initramfs: %w", err)
		}
	}
	return w.err
}

// entry validates name, adds missing parent directories, then writes the record.
func (w *Writer) entry(name string, mode, nlink uint32, data []byte, rmajor, rminor uint32) error {
	if w.done {
		return ErrClosed
	}
	if w.err != nil {
		return w.err
	}
	clean, err := cleanName(name)
	if err != nil {
		return err
	}
	if w.names[clean] {
		return fmt.Errorf("initramfs: %q added twice: %w", clean, errdefs.ErrAlreadyExists)
	}
	if err := w.parents(clean); err != nil {
		return err
	}
	w.names[clean] = true
	w.writeRecord(clean, mode, w.nextIno(), nlink, data, rmajor, rminor)
	return w.err
}

// parents adds every missing ancestor directory of name, outermost first.
func (w *Writer) parents(name string) error {
	dir := path.Dir(name)
	if dir == "." || w.names[dir] {
		return nil
	}
	if err := w.parents(dir); err != nil {
		return err
	}
	w.names[dir] = true
	w.writeRecord(dir, modeDir|0o755, w.nextIno(), 2, nil, 0, 0)
	return w.err
}

func (w *Writer) nextIno() uint32 {
	w.ino++
	return w.ino
}

// writeRecord writes one header, the NUL-terminated name and the data, each of the last two padded so that
// the next part starts on a 4-byte boundary.
func (w *Writer) writeRecord(name string, mode, ino, nlink uint32, data []byte, rmajor, rminor uint32) {
	if w.err != nil {
		return
	}
	hdr := fmt.Sprintf("%s%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		newcMagic, ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	w.write([]byte(hdr))
	w.write([]byte(name))
	w.write([]byte{0})
	w.pad()
	w.write(data)
	w.pad()
}

func (w *Writer) write(b []byte) {
	if w.err != nil || len(b) == 0 {
		return
	}
	n, err := w.out.Write(b)
	w.n += int64(n)
	if err != nil {
		w.err = fmt.Errorf("initramfs: %w", err)
	}
}

func (w *Writer) pad() {
	var zeros [3]byte
	w.write(zeros[:padLen(w.n)])
}

// padLen is the number of bytes that bring n to a multiple of 4.
func padLen(n int64) int64 { return (4 - n%4) % 4 }

// cleanName turns name into the form the archive stores: relative to the root, no "." or ".." parts.
func cleanName(name string) (string, error) {
	clean := strings.TrimPrefix(path.Clean("/"+name), "/")
	if clean == "" || clean == trailerName || strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("initramfs: invalid entry name %q: %w", name, errdefs.ErrInvalidArgument)
	}
	return clean, nil
}

// unixPerm converts the permission, setuid, setgid and sticky bits of mode to their Unix values.
func unixPerm(mode fs.FileMode) uint32 {
	m := uint32(mode.Perm())
	if mode&fs.ModeSetuid != 0 {
		m |= 0o4000
	}
	if mode&fs.ModeSetgid != 0 {
		m |= 0o2000
	}
	if mode&fs.ModeSticky != 0 {
		m |= 0o1000
	}
	return m
}
