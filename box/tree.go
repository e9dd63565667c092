package box

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"syscall"

	"github.com/boxd-dev/boxd/agent"
	"github.com/containerd/errdefs"
	"github.com/pkg/sftp"
)

// PutTree copies the tree at hostDir into box name as guestDir (an
// absolute path in the guest; what was there is replaced), over SFTP on
// the box's agent link: folders, regular files and symbolic links, with
// their modes and owners. Other kinds of file (devices, fifos, sockets)
// are skipped: a box makes its own /dev.
func (m *Manager) PutTree(ctx context.Context, name, hostDir, guestDir string) error {
	if !path.IsAbs(guestDir) || path.Clean(guestDir) == "/" {
		return fmt.Errorf("box %s: %q is not a folder a tree can be put in: %w", name, guestDir, errdefs.ErrInvalidArgument)
	}
	sc, err := m.sftp(ctx, name)
	if err != nil {
		return err
	}
	defer sc.Close()
	if err := sc.RemoveAll(guestDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("box %s: clearing %s: %w", name, guestDir, err)
	}
	if err := sc.MkdirAll(path.Dir(guestDir)); err != nil {
		return fmt.Errorf("box %s: %s: %w", name, path.Dir(guestDir), err)
	}
	err = filepath.WalkDir(hostDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(hostDir, p)
		if err != nil {
			return err
		}
		dst := path.Join(guestDir, filepath.ToSlash(rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := sc.Mkdir(dst); err != nil {
				return err
			}
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return sc.Symlink(target, dst) // an owner of its own is rarely wanted, and SFTP follows links
		case d.Type().IsRegular():
			if err := putFile(sc, p, dst); err != nil {
				return err
			}
		default:
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			if err := sc.Chown(dst, int(st.Uid), int(st.Gid)); err != nil {
				return err
			}
		}
		return sc.Chmod(dst, info.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
	})
	if err != nil {
		return fmt.Errorf("box %s: putting %s at %s: %w", name, hostDir, guestDir, err)
	}
	return nil
}

// putFile copies the host's file src to the guest's dst.
func putFile(sc *sftp.Client, src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := sc.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL)
	if err != nil {
		return err
	}
	_, err = out.ReadFrom(in)
	return errors.Join(err, out.Close())
}

// RemoveTree removes guestDir, an absolute path, from box name; a path
// that is not there is no error.
func (m *Manager) RemoveTree(ctx context.Context, name, guestDir string) error {
	if !path.IsAbs(guestDir) || path.Clean(guestDir) == "/" {
		return fmt.Errorf("box %s: %q is not a folder to remove: %w", name, guestDir, errdefs.ErrInvalidArgument)
	}
	sc, err := m.sftp(ctx, name)
	if err != nil {
		return err
	}
	defer sc.Close()
	if err := sc.RemoveAll(guestDir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("box %s: removing %s: %w", name, guestDir, err)
	}
	return nil
}

// sftp opens an SFTP session with box name's agent, starting or resuming
// the box as a connection would.
func (m *Manager) sftp(ctx context.Context, name string) (*sftp.Client, error) {
	c, err := m.Client(ctx, name)
	if err != nil {
		return nil, err
	}
	sess, err := c.SSH().NewSession()
	if err != nil {
		return nil, fmt.Errorf("box %s: sftp: %w", name, err)
	}
	w, err1 := sess.StdinPipe()
	r, err2 := sess.StdoutPipe()
	if err := errors.Join(err1, err2, sess.RequestSubsystem(agent.ExactSFTP)); err != nil {
		sess.Close()
		return nil, fmt.Errorf("box %s: sftp: %w", name, err)
	}
	sc, err := sftp.NewClientPipe(r, w, sftp.UseConcurrentWrites(true))
	if err != nil {
		sess.Close()
		return nil, fmt.Errorf("box %s: sftp: %w", name, err)
	}
	return sc, nil
}
