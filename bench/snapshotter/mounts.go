package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"golang.org/x/sys/unix"
)

// unmountUnder unmounts everything mounted at or below dir, lazily when a
// plain unmount is refused, going round while mounts are stacked.
func unmountUnder(dir string) error {
	var errs []error
	for range 8 {
		mps, err := mountinfo.Under(dir)
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		errs = errs[:0]
		for _, mp := range mps {
			err := unix.Unmount(mp, 0)
			if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				err = unix.Unmount(mp, unix.MNT_DETACH)
			}
			if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
			}
		}
	}
	if mps, err := mountinfo.Under(dir); err == nil && len(mps) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %s", strings.Join(mps, ", ")))
	}
	return errors.Join(errs...)
}

// detachLoopsUnder detaches the loop devices whose backing file is at or
// below dir (a loop device is normally released when its filesystem is
// unmounted; this catches one left behind by a failure).
func detachLoopsUnder(dir string) error {
	_, err := mountinfo.DetachLoopsUnder(dir)
	return err
}

// cleaner undoes what the run made: mounts, loop devices and the work
// folder, once, from the normal exit path or from a signal.
type cleaner struct {
	mu      sync.Mutex
	done    bool
	work    string         // removed at the end
	unmount []string       // other folders to unmount (debootstrap's target)
	closers []func() error // snapshotters and stores still open
}

func (c *cleaner) addCloser(fn func() error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closers = append(c.closers, fn)
}

func (c *cleaner) addUnmount(dir string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unmount = append(c.unmount, dir)
}

// run cleans up. closeAll is false on a signal: the stores may be in use
// by the main goroutine, and the process exits right after, which closes
// them.
func (c *cleaner) run(closeAll bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return nil
	}
	c.done = true
	var errs []error
	dirs := append([]string{}, c.unmount...)
	if c.work != "" {
		dirs = append(dirs, c.work)
	}
	for _, d := range dirs {
		if err := unmountUnder(d); err != nil {
			errs = append(errs, err)
		}
	}
	if closeAll {
		for i := len(c.closers) - 1; i >= 0; i-- {
			if err := c.closers[i](); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if c.work != "" {
		if err := detachLoopsUnder(c.work); err != nil {
			errs = append(errs, err)
		}
		if mps, err := mountinfo.Under(c.work); err != nil {
			errs = append(errs, fmt.Errorf("not removing %s: %w", c.work, err))
		} else if len(mps) > 0 {
			errs = append(errs, fmt.Errorf("not removing %s: still mounted under it: %s", c.work, strings.Join(mps, ", ")))
		} else if err := removeAll(c.work); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeAll is os.RemoveAll, tried again a few times: on a signal the main
// goroutine may still be adding files.
func removeAll(dir string) error {
	var err error
	for range 5 {
		if err = os.RemoveAll(dir); err == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return err
}
