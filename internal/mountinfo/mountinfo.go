// Package mountinfo finds what is mounted, and which loop devices are
// attached, below a folder, and detaches those loop devices: what tests and
// benchmarks must undo after them.
package mountinfo

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Under returns the mount points at or below dir, deepest first; a point
// with mounts stacked on it comes back once for each.
func Under(dir string) ([]string, error) {
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
		if mp := unescape(fields[4]); mp == dir || strings.HasPrefix(mp, dir+"/") {
			mps = append(mps, mp)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	slices.SortStableFunc(mps, func(a, b string) int { return len(b) - len(a) })
	return mps, nil
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
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

// Loop is an attached loop device and the file behind it.
type Loop struct {
	Device  string // /dev/loopN
	Backing string
}

// LoopsUnder returns the loop devices whose backing file is at or below dir.
func LoopsUnder(dir string) ([]Loop, error) {
	files, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	var out []Loop
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if backing == dir || strings.HasPrefix(backing, dir+"/") {
			out = append(out, Loop{Device: "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f))), Backing: backing})
		}
	}
	return out, nil
}

// DetachLoopsUnder detaches the loop devices whose backing file is at or
// below dir (one is normally released with its filesystem; this catches those
// a failure left) and returns the ones it found.
func DetachLoopsUnder(dir string) ([]Loop, error) {
	loops, err := LoopsUnder(dir)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, l := range loops {
		f, err := os.OpenFile(l.Device, os.O_RDWR, 0)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
			errs = append(errs, fmt.Errorf("detaching %s (%s): %w", l.Device, l.Backing, err))
		}
		f.Close()
	}
	return loops, errors.Join(errs...)
}
