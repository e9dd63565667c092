package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Boot timeouts. Under TCG a guest is slow, and drivers probe their devices after their module has loaded.
const (
	rootWait = 10 * time.Second // for the root disk's device node
	linkWait = 5 * time.Second  // for eth0
	portWait = 10 * time.Second // for the agent's virtio-serial port
)

// newRoot is where the root disk is mounted before it becomes /.
const newRoot = "/newroot"

// Init is the agent's life as PID 1 of a box. It boots the machine in named steps (the early filesystems, the
// kernel modules of ModuleOrderFile, the root disk, the switch to it, the hostname, the network; see BootConfig
// for what the kernel command line sets), then reaps orphans and serves the host on the virtio-serial port,
// printing "boxd-agent: ready" on the console once the port is open. It never returns: a boot that fails prints
// one line on the console, "boxd-agent: boot failed: STEP: REASON", and waits, since PID 1 exiting would panic
// the kernel and hide the message.
//
// The initramfs must hold /dev/console (character device 5:1): the kernel gives it to PID 1 as stdin, stdout and
// stderr, and Go's runtime refuses to start without them.
func Init() {
	b := &boot{console: os.Stdout, cfg: DefaultBootConfig()}
	steps := []struct {
		name string
		run  func() error
		soft bool // a failure is logged and the boot goes on
	}{
		{name: "mount early filesystems", run: b.mountEarly},
		{name: "read the kernel command line", run: b.readCmdline},
		{name: "load kernel modules", run: b.loadModules, soft: true},
		{name: "mount the root disk", run: b.mountRoot},
		{name: "switch root", run: b.switchRoot},
		{name: "mount cgroup2", run: b.mountCgroup, soft: true},
		{name: "set the hostname", run: b.setHostname, soft: true},
		{name: "configure the network", run: b.configureNetwork, soft: true},
		{name: "write /etc/resolv.conf", run: b.writeResolvConf, soft: true},
		{name: "install the box command", run: installBoxCommand, soft: true},
	}
	for _, s := range steps {
		if err := s.run(); err != nil {
			if !s.soft {
				b.fail(s.name, err)
			}
			b.logf("%s: %v (going on)", s.name, err)
		}
	}
	os.Setenv("PATH", DefaultPath)
	os.Setenv("HOME", "/root")

	ctx := context.Background()
	reaper := NewReaper()
	go reaper.Run(ctx)
	go b.handleSignals()

	key, err := NewHostKey()
	if err != nil {
		b.fail("make the host key", err)
	}
	port, err := FindPort(ctx, b.cfg.Port, portWait)
	if err != nil {
		b.fail("find the agent's port", err)
	}
	var ready sync.Once
	next := NextPortConn(port, func() { ready.Do(func() { b.logf("ready") }) })
	go func() {
		if err := ServeBox(ctx, BoxSocket, b.logf); err != nil {
			b.logf("the box command is not served: %v", err)
		}
	}()
	cfg := &ServerConfig{HostKey: key, System: OS{}, Reaper: reaper, Logf: b.logf, ForkFile: ForkFile}
	err = ServeSerial(ctx, next, cfg)
	b.fail("serve the host", fmt.Errorf("agent: serving ended: %w", err))
}

// boot is the state of Init's steps.
type boot struct {
	console io.Writer
	cfg     BootConfig
}

func (b *boot) logf(format string, args ...any) {
	fmt.Fprintf(b.console, "boxd-agent: "+format+"\n", args...)
}

// fail reports a failed step and waits forever: PID 1 must not exit.
func (b *boot) fail(step string, err error) {
	b.logf("boot failed: %s: %v", step, err)
	for {
		time.Sleep(time.Hour) // a timer keeps the runtime from declaring a deadlock
	}
}

// mountEarly mounts what the agent and every program expect from the start. A mount that is there already is fine.
func (b *boot) mountEarly() error {
	const nosuid, nodev, noexec = unix.MS_NOSUID, unix.MS_NODEV, unix.MS_NOEXEC
	mounts := []struct {
		source, target, fstype string
		flags                  uintptr
		data                   string
	}{
		{"proc", "/proc", "proc", nosuid | nodev | noexec, ""},
		{"sysfs", "/sys", "sysfs", nosuid | nodev | noexec, ""},
		{"devtmpfs", "/dev", "devtmpfs", nosuid, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", nosuid | noexec, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"tmpfs", "/dev/shm", "tmpfs", nosuid | nodev, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", nosuid | nodev, "mode=0755"},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("agent: mkdir %s: %w", m.target, err)
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("agent: mount %s on %s: %w", m.fstype, m.target, err)
		}
		if m.target == "/dev" {
			b.useConsole()
		}
	}
	// What udev would make: bash's process substitution and many scripts need /dev/fd.
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0", "/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2", "/dev/ptmx": "pts/ptmx",
	} {
		if _, err := os.Lstat(name); err == nil {
			continue // devtmpfs's own ptmx reaches the devpts on /dev/pts already
		}
		if err := os.Symlink(target, name); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("agent: %w", err)
		}
	}
	return nil
}

// useConsole sends the agent's stdout and stderr to devtmpfs's /dev/console, in case the kernel found no console
// in the initramfs.
func (b *boot) useConsole() {
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	for _, target := range []int{1, 2} {
		if fd != target {
			_ = unix.Dup3(fd, target, 0)
		}
	}
	if fd > 2 {
		unix.Close(fd)
	}
}

func (b *boot) readCmdline() error {
	data, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	cfg, err := ParseCmdline(string(data))
	if err != nil {
		return err
	}
	b.cfg = cfg
	for k, v := range cfg.Unknown {
		b.logf("unknown kernel parameter %s=%s ignored", k, v)
	}
	return nil
}

// loadModules loads the modules ModuleOrderFile lists, in order. One that is loaded already (or built in) is
// fine; one that fails is reported and the rest still load.
func (b *boot) loadModules() error {
	f, err := os.Open(ModuleOrderFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel with the drivers built in
	}
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	names, err := ReadModuleOrder(f)
	f.Close()
	if err != nil {
		return err
	}
	var errs []error
	for _, name := range names {
		if err := loadModule(filepath.Join(ModulesDir, name)); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("agent: module: %w", err)
	}
	defer f.Close()
	flags := 0
	if moduleCompression(path) != "ko" {
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	err = control(f, func(fd int) error { return unix.FinitModule(fd, "", flags) })
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("agent: load module %s: %w", filepath.Base(path), err)
	}
	return nil
}

// mountRoot mounts the root disk on newRoot, once its device node appears.
func (b *boot) mountRoot() error {
	if b.cfg.Root == "none" {
		return nil
	}
	deadline := time.Now().Add(rootWait)
	for {
		if _, err := os.Stat(b.cfg.Root); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent: no root device %s after %v (is the disk attached and its driver loaded?)", b.cfg.Root, rootWait)
		}
		time.Sleep(portPoll)
	}
	if err := os.MkdirAll(newRoot, 0o755); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if err := unix.Mount(b.cfg.Root, newRoot, b.cfg.RootFSType, 0, ""); err != nil {
		return fmt.Errorf("agent: mount %s (%s) on %s: %w", b.cfg.Root, b.cfg.RootFSType, newRoot, err)
	}
	return nil
}

// switchRoot makes the root disk /: the early mounts move into it, the initramfs's files are deleted to give
// their memory back (the agent runs on from memory), and the root disk is moved over / and chrooted into.
func (b *boot) switchRoot() error {
	if b.cfg.Root == "none" {
		return nil
	}
	for _, m := range []string{"/proc", "/sys", "/dev", "/run"} {
		target := newRoot + m
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("agent: move %s to %s: %w", m, target, err)
		}
	}
	if err := removeInitramfs(); err != nil {
		b.logf("initramfs not freed: %v", err)
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("agent: chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("agent: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("agent: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("agent: chdir /: %w", err)
	}
	return nil
}

// removeInitramfs deletes the initramfs's files, never crossing into another filesystem, and only if / is the
// initramfs (ramfs or tmpfs).
func removeInitramfs() error {
	var fs unix.Statfs_t
	if err := unix.Statfs("/", &fs); err != nil {
		return fmt.Errorf("statfs /: %w", err)
	}
	if fs.Type != unix.RAMFS_MAGIC && fs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("/ is not an initramfs (filesystem type %#x)", fs.Type)
	}
	var root unix.Stat_t
	if err := unix.Lstat("/", &root); err != nil {
		return fmt.Errorf("stat /: %w", err)
	}
	entries, err := os.ReadDir("/")
	if err != nil {
		return err
	}
	for _, e := range entries {
		if "/"+e.Name() != newRoot {
			removeTree("/"+e.Name(), root.Dev)
		}
	}
	return nil
}

// removeTree deletes path and what is under it on the filesystem dev, best effort.
func removeTree(path string, dev uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil || st.Dev != dev {
		return
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		entries, _ := os.ReadDir(path)
		for _, e := range entries {
			removeTree(filepath.Join(path, e.Name()), dev)
		}
		_ = unix.Rmdir(path)
		return
	}
	_ = unix.Unlink(path)
}

// mountCgroup mounts the unified cgroup hierarchy, which container runtimes in a box expect.
func (b *boot) mountCgroup() error {
	const target = "/sys/fs/cgroup"
	if err := unix.Mount("cgroup2", target, "cgroup2", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil &&
		!errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("agent: mount cgroup2 on %s: %w", target, err)
	}
	return nil
}

func (b *boot) setHostname() error {
	return OS{}.SetHostname(b.cfg.Hostname)
}

// configureNetwork brings lo up, and eth0 with its address and default route unless boxd.ip=none.
func (b *boot) configureNetwork() error {
	r, err := openRTNL()
	if err != nil {
		return err
	}
	defer r.Close()
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if err := r.linkUp(lo.Index); err != nil {
		return err
	}
	if !b.cfg.IP.IsValid() {
		return nil
	}
	deadline := time.Now().Add(linkWait)
	eth, err := net.InterfaceByName("eth0")
	for err != nil && time.Now().Before(deadline) {
		time.Sleep(portPoll)
		eth, err = net.InterfaceByName("eth0")
	}
	if err != nil {
		return fmt.Errorf("agent: no eth0 after %v (is virtio_net loaded?): %w", linkWait, err)
	}
	return configureLink(r, eth.Index, b.cfg)
}

// configureLink brings the link with index up with cfg's address and default route.
func configureLink(r *rtnl, index int, cfg BootConfig) error {
	if err := r.linkUp(index); err != nil {
		return err
	}
	if err := r.addAddr(index, cfg.IP); err != nil {
		return err
	}
	if cfg.Gateway.IsValid() {
		return r.addDefaultRoute(index, cfg.Gateway)
	}
	return nil
}

// writeResolvConf points the resolver at boxd.dns, replacing what was there (a link to a resolver that does not
// run in a box included).
func (b *boot) writeResolvConf() error {
	if len(b.cfg.DNS) == 0 {
		return nil
	}
	var sb strings.Builder
	for _, a := range b.cfg.DNS {
		fmt.Fprintf(&sb, "nameserver %s\n", a)
	}
	return writeFileAtomic("/etc/resolv.conf", []byte(sb.String()), 0o644)
}

// handleSignals keeps PID 1 alive against stray signals (Go's default for SIGTERM and SIGINT is to exit, and the
// kernel only delivers to PID 1 the signals it handles), and turns busybox's reboot, halt and poweroff signals
// into what they ask for.
func (b *boot) handleSignals() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR)
	for sig := range sigs {
		switch sig {
		case unix.SIGTERM:
			b.shutdown(unix.LINUX_REBOOT_CMD_RESTART)
		case unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR:
			b.shutdown(unix.LINUX_REBOOT_CMD_POWER_OFF)
		default:
			b.logf("signal %v ignored", sig)
		}
	}
}

// shutdown ends every process, leaves the root disk clean and restarts or powers off the machine.
func (b *boot) shutdown(cmd int) {
	b.logf("shutting down")
	_ = unix.Kill(-1, unix.SIGTERM)
	time.Sleep(time.Second)
	_ = unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	if err := unix.Reboot(cmd); err != nil {
		b.logf("reboot: %v", err)
	}
}

// BoxCommandPath is where the box command is found in a box: a link to
// the agent's own binary, which runs as the box command under that name.
const BoxCommandPath = "/usr/local/bin/box"

// installBoxCommand links BoxCommandPath to the agent's binary (which the
// initramfs held: only /proc/1/exe still reaches it).
func installBoxCommand() error {
	if target, err := os.Readlink(BoxCommandPath); err == nil && target == "/proc/1/exe" {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(BoxCommandPath), 0o755); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	_ = os.Remove(BoxCommandPath)
	if err := os.Symlink("/proc/1/exe", BoxCommandPath); err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	return nil
}
