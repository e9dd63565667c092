package cli

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/boxd-dev/boxd/daemon"
	"github.com/containerd/errdefs"
)

// copyMissing is the status of the copy-out's shell when the box path is
// not there.
const copyMissing = 66

// copyOutScript archives $2 in folder $1 on stdout, or exits copyMissing.
const copyOutScript = `cd "$1" 2>/dev/null && [ -e "$2" ] || exit 66; exec tar -cf - "$2"`

// copyOut copies boxPath out of box name to hostPath: a file to the file
// hostPath, a folder's contents into the folder hostPath. It streams a tar
// archive made in the box through exec and unpacks it with unpackTar.
func copyOut(ctx context.Context, d *daemon.Client, name, boxPath, hostPath string) error {
	clean := path.Clean(boxPath)
	dir, base := path.Dir(clean), path.Base(clean)
	pr, pw := io.Pipe()
	unpacked := make(chan error, 1)
	go func() {
		err := unpackTar(pr, base, hostPath)
		// Whatever is left is read, so that the command is not held up.
		_, _ = io.Copy(io.Discard, pr)
		unpacked <- err
	}()
	stderr := &capped{max: 4 << 10}
	code, err := d.ExecStream(ctx, name, daemon.ExecOptions{
		Args: []string{"sh", "-c", copyOutScript, "sh", dir, base}, Stdout: pw, Stderr: stderr,
	})
	if err == nil {
		pw.Close()
	} else {
		pw.CloseWithError(err)
	}
	uerr := <-unpacked
	switch {
	case err != nil:
		return fmt.Errorf("copy-out %s: %w", boxPath, err)
	case code == copyMissing:
		return fmt.Errorf("copy-out %s: no such file or folder in the box: %w", boxPath, errdefs.ErrNotFound)
	case code != 0:
		return fmt.Errorf("copy-out %s: tar in the box exited with status %d: %s", boxPath, code, strings.TrimSpace(stderr.String()))
	case uerr != nil:
		return fmt.Errorf("copy-out %s to %s: %w", boxPath, hostPath, uerr)
	}
	return nil
}

// unpackTar writes the tar archive of r, whose entries are base and what
// is under it, to dest: base itself becomes dest. It writes only inside
// dest: entries outside base, with ".." or absolute, are refused, a
// folder on the way that is a symbolic link is refused, a file is never
// opened through a symbolic link, and symbolic links, hard links and
// special files in the archive are skipped (they could point anywhere on
// the host).
func unpackTar(r io.Reader, base, dest string) error {
	tr := tar.NewReader(r)
	dest = filepath.Clean(dest)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading the archive: %w", err)
		}
		name := path.Clean(h.Name)
		var rel string
		switch {
		case name == base:
		case strings.HasPrefix(name, base+"/"):
			rel = name[len(base)+1:]
			if !filepath.IsLocal(rel) {
				return fmt.Errorf("the archive holds %q, outside %s: %w", h.Name, base, errdefs.ErrInvalidArgument)
			}
		default:
			return fmt.Errorf("the archive holds %q, outside %s: %w", h.Name, base, errdefs.ErrInvalidArgument)
		}
		target := filepath.Join(dest, filepath.FromSlash(rel))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := safeDirs(dest, rel, true); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := safeDirs(dest, path.Dir(rel), rel != ""); err != nil {
				return err
			}
			if err := writeFile(target, tr, fs.FileMode(h.Mode)&0o777); err != nil {
				return err
			}
		default:
			// Links and special files are left out.
		}
	}
}

// safeDirs makes the folders dest/rel (rel "" or "." is dest itself; dest
// only when withDest), refusing any that is a symbolic link or not a
// folder. dest's own parents are the caller's.
func safeDirs(dest, rel string, withDest bool) error {
	if rel == "." {
		rel = ""
	}
	if !withDest && rel == "" {
		return os.MkdirAll(filepath.Dir(dest), 0o755)
	}
	if err := os.MkdirAll(filepath.Dir(dest), 0o755); err != nil {
		return err
	}
	p := dest
	parts := []string{}
	if rel != "" {
		parts = strings.Split(rel, "/")
	}
	for i := -1; i < len(parts); i++ {
		if i >= 0 {
			p = filepath.Join(p, parts[i])
		}
		st, err := os.Lstat(p)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
		case err != nil:
			return err
		case st.Mode()&fs.ModeSymlink != 0:
			return fmt.Errorf("%s is a symbolic link; refusing to write through it: %w", p, errdefs.ErrInvalidArgument)
		case !st.IsDir():
			return fmt.Errorf("%s is not a folder: %w", p, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// writeFile writes r to path with mode, never through a symbolic link.
func writeFile(path string, r io.Reader, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, mode|0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
