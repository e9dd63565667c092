package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// portPoll is how often the agent looks for the host on its port: the port can only say whether the host is
// connected (POLLHUP while it is not), not wake anyone when it connects.
const portPoll = 20 * time.Millisecond

// virtioPortsDir lists the virtio-serial ports, each with the name the host gave it.
const virtioPortsDir = "/sys/class/virtio-ports"

// FindPort returns the device node (/dev/vportNpM) of the virtio-serial port named name, waiting up to timeout
// for the driver to bring it up. Not finding it is an error that wraps errdefs.ErrNotFound.
func FindPort(ctx context.Context, name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		entries, _ := os.ReadDir(virtioPortsDir)
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(virtioPortsDir, e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := filepath.Join("/dev", e.Name())
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("agent: no virtio-serial port named %q in %s after %v (is virtio_console loaded and the port on QEMU's command line?): %w",
				name, virtioPortsDir, timeout, errdefs.ErrNotFound)
		}
		if !sleepCtx(ctx, portPoll) {
			return "", ctx.Err()
		}
	}
}

// NextPortConn returns the function ServeSerial wants for the port at path: each call opens the port afresh
// (a new open drops what an old connection left in the guest's buffers) and returns it once the host is
// connected. The file is pollable, so closing it wakes a pending read or write. opened, when not nil, is called
// after each open, before the wait for the host.
func NextPortConn(path string, opened func()) func(ctx context.Context) (io.ReadWriteCloser, error) {
	return func(ctx context.Context) (io.ReadWriteCloser, error) {
		f, err := openPort(ctx, path)
		if err != nil {
			return nil, err
		}
		if opened != nil {
			opened()
		}
		if err := waitHost(ctx, f); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
}

// openPort opens the port, retrying while the last open of it is still being closed (the driver lets one
// opener in at a time).
func openPort(ctx context.Context, path string) (*os.File, error) {
	for {
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOCTTY, 0)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("agent: open port: %w", err)
		}
		if !sleepCtx(ctx, portPoll) {
			return nil, ctx.Err()
		}
	}
}

// waitHost returns once the host side of the port is connected.
func waitHost(ctx context.Context, f *os.File) error {
	for {
		connected := false
		err := control(f, func(fd int) error {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
			_, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				return nil // not known yet: poll again
			}
			if err != nil {
				return err
			}
			connected = fds[0].Revents&(unix.POLLHUP|unix.POLLERR|unix.POLLNVAL) == 0
			return nil
		})
		if err != nil {
			return fmt.Errorf("agent: poll port: %w", err)
		}
		if connected {
			return nil
		}
		if !sleepCtx(ctx, portPoll) {
			return ctx.Err()
		}
	}
}
