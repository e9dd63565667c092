package qemu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/containerd/errdefs"
)

// The layout of a new, empty qcow2 (version 3) overlay, as qemu-img
// create writes it: the header in cluster 0, the refcount table in
// cluster 1, its one refcount block in cluster 2 and the L1 table in
// cluster 3; no L2 table or data yet.
const (
	qcow2ClusterBits   = 16
	qcow2Cluster       = 1 << qcow2ClusterBits
	qcow2HeaderLength  = 112 // version 3 with the compression type byte, padded
	qcow2ExtBackingFmt = 0xE2792ACA
	qcow2ExtEnd        = 0
)

// createOverlayFile makes path a new, empty qcow2 image over backing, whose
// format is backingFormat and virtual size size: what `qemu-img create -f
// qcow2 -F FORMAT -b BACKING` writes, without starting a process (which
// takes tens of milliseconds, on the path of every restore).
func createOverlayFile(path, backing, backingFormat string, size int64) error {
	if size <= 0 {
		return fmt.Errorf("qemu: overlay over %s: virtual size %d: %w", backing, size, errdefs.ErrInvalidArgument)
	}
	// Each L2 table maps cluster/8 clusters.
	l1Size := (size + qcow2Cluster*(qcow2Cluster/8) - 1) / (qcow2Cluster * (qcow2Cluster / 8))
	if l1Size*8 > qcow2Cluster {
		return fmt.Errorf("qemu: overlay over %s: %d bytes is too big for one L1 cluster: %w", backing, size, errdefs.ErrInvalidArgument)
	}
	hdr := make([]byte, qcow2Cluster)
	be := binary.BigEndian
	copy(hdr, qcow2Magic)
	be.PutUint32(hdr[4:], 3)
	be.PutUint32(hdr[20:], qcow2ClusterBits)
	be.PutUint64(hdr[24:], uint64(size))
	be.PutUint32(hdr[36:], uint32(l1Size))
	be.PutUint64(hdr[40:], 3*qcow2Cluster) // L1 table
	be.PutUint64(hdr[48:], 1*qcow2Cluster) // refcount table
	be.PutUint32(hdr[56:], 1)              // refcount table clusters
	be.PutUint32(hdr[96:], 4)              // refcount order: 16-bit refcounts
	be.PutUint32(hdr[100:], qcow2HeaderLength)
	off := qcow2HeaderLength
	ext := func(typ uint32, data []byte) {
		be.PutUint32(hdr[off:], typ)
		be.PutUint32(hdr[off+4:], uint32(len(data)))
		copy(hdr[off+8:], data)
		off += 8 + (len(data)+7)/8*8
	}
	ext(qcow2ExtBackingFmt, []byte(backingFormat))
	ext(qcow2ExtEnd, nil)
	if off+len(backing) > qcow2Cluster {
		return fmt.Errorf("qemu: overlay over %s: backing file name too long: %w", backing, errdefs.ErrInvalidArgument)
	}
	be.PutUint64(hdr[8:], uint64(off))
	be.PutUint32(hdr[16:], uint32(len(backing)))
	copy(hdr[off:], backing)

	refTable := make([]byte, 8)
	be.PutUint64(refTable, 2*qcow2Cluster)
	refBlock := make([]byte, 8) // clusters 0 to 3 are in use, once each
	for i := range 4 {
		be.PutUint16(refBlock[2*i:], 1)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("qemu: overlay: %w", err)
	}
	for _, w := range []struct {
		b   []byte
		off int64
	}{{hdr[:off+len(backing)], 0}, {refTable, qcow2Cluster}, {refBlock, 2 * qcow2Cluster}} {
		if _, err = f.WriteAt(w.b, w.off); err != nil {
			break
		}
	}
	if err == nil {
		err = f.Truncate(3*qcow2Cluster + l1Size*8) // the L1 table, all zero
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("qemu: overlay %s: %w", path, err)
	}
	return nil
}

// virtualSize is the size of the disk image at path as its guest sees it:
// a qcow2 image's header says; a raw image is its file.
func virtualSize(path, format string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("qemu: disk: %w", err)
	}
	defer f.Close()
	if format != "qcow2" {
		fi, err := f.Stat()
		if err != nil {
			return 0, fmt.Errorf("qemu: disk: %w", err)
		}
		return fi.Size(), nil
	}
	var b [8]byte
	if _, err := f.ReadAt(b[:], 24); err != nil {
		if errors.Is(err, io.EOF) {
			err = fmt.Errorf("short header: %w", errdefs.ErrDataLoss)
		}
		return 0, fmt.Errorf("qemu: disk %s: qcow2 header: %w", path, err)
	}
	return int64(binary.BigEndian.Uint64(b[:])), nil
}

// BackingChain lists the disk image at path and the images under it, top
// first, as their qcow2 headers name them (a relative name is relative to
// the image that names it). It stops at a raw image, a file it cannot
// read, or after 1000 images.
func BackingChain(path string) []string {
	var chain []string
	for range 1000 {
		chain = append(chain, path)
		next, err := backingFile(path)
		if err != nil || next == "" {
			break
		}
		if !filepath.IsAbs(next) {
			next = filepath.Join(filepath.Dir(path), next)
		}
		path = next
	}
	return chain
}

// backingFile is the backing file a qcow2 image's header names ("" for
// none, or for a raw image).
func backingFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var hdr [20]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return "", err
	}
	if !bytes.Equal(hdr[:4], qcow2Magic) {
		return "", nil
	}
	off, size := binary.BigEndian.Uint64(hdr[8:]), binary.BigEndian.Uint32(hdr[16:])
	if off == 0 || size == 0 {
		return "", nil
	}
	if size > 4096 {
		return "", fmt.Errorf("qemu: %s: backing file name of %d bytes: %w", path, size, errdefs.ErrDataLoss)
	}
	name := make([]byte, size)
	if _, err := f.ReadAt(name, int64(off)); err != nil {
		return "", err
	}
	return string(name), nil
}
