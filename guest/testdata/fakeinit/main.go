// Command fakeinit stands in for boxd-agent as /init in the guest package's
// boot test: it loads the modules the initramfs lists, in its order, mounts
// the root disk the command line names, and reports what it found on the
// console before powering off.
package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	err := run()
	if err != nil {
		fmt.Printf("fakeinit-failed: %v\n", err)
	}
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

func run() error {
	if err := unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, ""); err != nil {
		return fmt.Errorf("mounting /dev: %w", err)
	}
	for _, m := range [][2]string{{"proc", "/proc"}, {"sysfs", "/sys"}} {
		if err := unix.Mount(m[0], m[1], m[0], 0, ""); err != nil {
			return fmt.Errorf("mounting %s: %w", m[1], err)
		}
	}
	order, err := os.ReadFile("/lib/modules/boxd/order")
	if err != nil {
		return err
	}
	loaded := 0
	for _, name := range strings.Fields(string(order)) {
		f, err := os.Open("/lib/modules/boxd/" + name)
		if err != nil {
			return err
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && err != unix.EEXIST {
			return fmt.Errorf("loading %s: %w", name, err)
		}
		loaded++
	}
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	params := map[string]string{}
	for _, f := range strings.Fields(string(cmdline)) {
		if k, v, ok := strings.Cut(f, "="); ok {
			params[k] = v
		}
	}
	root := params["boxd.root"]
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(root); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear", root)
		}
	}
	if err := unix.Mount(root, "/newroot", "ext4", 0, ""); err != nil {
		return fmt.Errorf("mounting %s: %w", root, err)
	}
	hello, err := os.ReadFile("/newroot/usr/bin/hello")
	if err != nil {
		return err
	}
	_, netErr := os.Stat("/sys/class/net/eth0")
	fmt.Printf("fakeinit-ok modules=%d hostname=%s root=%s eth0=%v hello=%q\n",
		loaded, params["boxd.hostname"], root, netErr == nil, hello)
	return unix.Unmount("/newroot", 0)
}
