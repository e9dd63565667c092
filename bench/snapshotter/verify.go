package main

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// verifyTree checks that the mounted container at mnt holds the root
// filesystem at rootfs, with image n's top layer on it: every entry of
// rootfs with the same type, permissions, owner, device number, link
// target and contents (modified, image n's changed file, has the base's
// contents as a prefix), and image n's added file. It returns the number
// of entries checked. Not timed.
func verifyTree(rootfs, mnt, modified string, n int) (int, error) {
	count := 0
	err := filepath.WalkDir(rootfs, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(rootfs, path)
		if err != nil {
			return err
		}
		want, err := os.Lstat(path)
		if err != nil {
			return err
		}
		got, err := os.Lstat(filepath.Join(mnt, rel))
		if err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		count++
		if rel == "." {
			return nil // the mount's root is the snapshotter's
		}
		if want.Mode() != got.Mode() {
			return fmt.Errorf("%s: mode %v, want %v", rel, got.Mode(), want.Mode())
		}
		ws, gs := want.Sys().(*syscall.Stat_t), got.Sys().(*syscall.Stat_t)
		if ws.Uid != gs.Uid || ws.Gid != gs.Gid {
			return fmt.Errorf("%s: owner %d:%d, want %d:%d", rel, gs.Uid, gs.Gid, ws.Uid, ws.Gid)
		}
		switch {
		case want.Mode()&(fs.ModeDevice|fs.ModeCharDevice) != 0:
			if ws.Rdev != gs.Rdev {
				return fmt.Errorf("%s: device %#x, want %#x", rel, gs.Rdev, ws.Rdev)
			}
		case want.Mode()&fs.ModeSymlink != 0:
			wl, err := os.Readlink(path)
			if err != nil {
				return err
			}
			gl, err := os.Readlink(filepath.Join(mnt, rel))
			if err != nil {
				return err
			}
			if wl != gl {
				return fmt.Errorf("%s: links to %q, want %q", rel, gl, wl)
			}
		case want.Mode().IsRegular():
			if rel == modified {
				return checkPrefix(path, filepath.Join(mnt, rel))
			}
			if want.Size() != got.Size() {
				return fmt.Errorf("%s: %d bytes, want %d", rel, got.Size(), want.Size())
			}
			wh, err := fileHash(path)
			if err != nil {
				return err
			}
			gh, err := fileHash(filepath.Join(mnt, rel))
			if err != nil {
				return err
			}
			if wh != gh {
				return fmt.Errorf("%s: contents differ", rel)
			}
		}
		return nil
	})
	if err != nil {
		return count, err
	}
	added := filepath.Join(mnt, addedFileDir, fmt.Sprintf("boxd-bench-image-%d.bin", n))
	st, err := os.Stat(added)
	if err != nil {
		return count, err
	}
	if st.Size() != addedFileBytes {
		return count, fmt.Errorf("%s: %d bytes, want %d", added, st.Size(), addedFileBytes)
	}
	return count + 1, nil
}

func fileHash(path string) ([sha256.Size]byte, error) {
	var sum [sha256.Size]byte
	f, err := os.Open(path)
	if err != nil {
		return sum, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return sum, err
	}
	copy(sum[:], h.Sum(nil))
	return sum, nil
}

// checkPrefix checks that the file got starts with the contents of want
// and is longer.
func checkPrefix(want, got string) error {
	w, err := os.ReadFile(want)
	if err != nil {
		return err
	}
	g, err := os.ReadFile(got)
	if err != nil {
		return err
	}
	if len(g) <= len(w) || !bytes.HasPrefix(g, w) {
		return errors.New(got + ": not the base's file with a line added")
	}
	return nil
}
