package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// mountsUnder returns the mount points at or below dir, deepest first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	// Deepest first; mounts stacked on one point come back once each.
	slices.SortStableFunc(mps, func(a, b string) int { return len(b) - len(a) })
	return mps, nil
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts everything mounted at or below dir, lazily when a
// plain unmount is refused, going round while mounts are stacked.
func unmountUnder(dir string) error {
	var errs []error
	for range 8 {
		mps, err := mountsUnder(dir)
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
	if mps, err := mountsUnder(dir); err == nil && len(mps) > 0 {
		errs = append(errs, fmt.Errorf("still mounted: %s", strings.Join(mps, ", ")))
	}
	return errors.Join(errs...)
}

// detachLoopsUnder detaches the loop devices whose backing file is at or
// below dir (a loop device is normally released when its filesystem is
// unmounted; this catches one left behind by a failure).
func detachLoopsUnder(dir string) error {
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return err
	}
	var errs []error
	for _, bf := range files {
		b, err := os.ReadFile(bf)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if backing != dir && !strings.HasPrefix(backing, dir+"/") {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
			errs = append(errs, fmt.Errorf("detaching %s (%s): %w", dev, backing, err))
		}
		f.Close()
	}
	return errors.Join(errs...)
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
		if mps, err := mountsUnder(c.work); err != nil {
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
