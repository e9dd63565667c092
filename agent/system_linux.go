package agent

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// OS is the System of the machine the agent runs on: it changes the kernel's RNG, clock and hostname and the
// files of the root filesystem. Only the agent as PID 1 of a box (or run with `serve --system`) uses it.
type OS struct{}

var _ System = OS{}

// AddEntropy adds seed to the kernel's RNG, credited, and reseeds it; without the ioctl (no CAP_SYS_ADMIN) the
// seed is written to /dev/urandom, which mixes it in without credit.
func (OS) AddEntropy(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("agent: entropy: %w", err)
	}
	defer f.Close()
	if err := addEntropy(f, seed); err == nil {
		return nil
	}
	if _, err := f.Write(seed); err != nil {
		return fmt.Errorf("agent: entropy: write /dev/urandom: %w", err)
	}
	return nil
}

// SetClock steps the realtime clock to t.
func (OS) SetClock(t time.Time) error {
	ts := unix.NsecToTimespec(t.UnixNano())
	if err := unix.ClockSettime(unix.CLOCK_REALTIME, &ts); err != nil {
		return fmt.Errorf("agent: set clock: %w", err)
	}
	return nil
}

// SetHostname sets the kernel's hostname and writes /etc/hostname.
func (OS) SetHostname(name string) error {
	if err := unix.Sethostname([]byte(name)); err != nil {
		return fmt.Errorf("agent: set hostname: %w", err)
	}
	return writeFileAtomic("/etc/hostname", []byte(name+"\n"), 0o644)
}

// SetMachineID writes /etc/machine-id.
func (OS) SetMachineID(id string) error {
	return writeFileAtomic("/etc/machine-id", []byte(id+"\n"), 0o444)
}

// writeFileAtomic replaces path with data: a reader sees the old file or the new one, never half of it. Its folder
// is made if the root file system has none (a container's, which may hold a single binary).
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir, base := filepath.Split(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("agent: write %s: %w", path, err)
	}
	f, err := os.CreateTemp(dir, "."+base+".*")
	if err != nil {
		return fmt.Errorf("agent: write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("agent: write %s: %w", path, err)
	}
	return nil
}

// readHealth reads the machine's Health from /proc and uname.
func readHealth() (Health, error) {
	var h Health
	up, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return h, fmt.Errorf("agent: health: %w", err)
	}
	if f := strings.Fields(string(up)); len(f) > 0 {
		h.Uptime, _ = strconv.ParseFloat(f[0], 64)
	}
	load, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return h, fmt.Errorf("agent: health: %w", err)
	}
	for i, f := range strings.Fields(string(load)) {
		if i == len(h.Load) {
			break
		}
		h.Load[i], _ = strconv.ParseFloat(f, 64)
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return h, fmt.Errorf("agent: health: uname: %w", err)
	}
	h.Kernel = unix.ByteSliceToString(uts.Release[:])
	h.Hostname = unix.ByteSliceToString(uts.Nodename[:])
	return h, nil
}
