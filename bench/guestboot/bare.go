package main

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/internal/initramfs"
)

// busybox is where Debian's busybox-static installs its static busybox.
const busybox = "/bin/busybox"

// bareInit is the bare boot's /init: one line on the console (markInit),
// then power off without syncing or unmounting anything.
const bareInit = "#!/bin/sh\necho " + markInit + "\nexec poweroff -f\n"

// markInit is the line bareInit prints.
const markInit = "guestboot: init"

// bareCmdline is the bare boot's kernel command line: the box's, less what
// only the agent reads.
const bareCmdline = "console=ttyS0 panic=-1 quiet"

// writeBareInitramfs writes a gzip newc initramfs holding the static
// busybox and bareInit, and returns its path.
func writeBareInitramfs(path string) (string, error) {
	if err := checkStaticBusybox(); err != nil {
		return "", err
	}
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	w := initramfs.NewGzipWriter(f)
	var errs []error
	for _, d := range []string{"/bin", "/dev", "/proc", "/sys"} {
		errs = append(errs, w.Dir(d, 0o755))
	}
	errs = append(errs,
		w.CharDev("/dev/console", 0o600, 5, 1),
		w.CopyFile("/bin/busybox", 0o755, busybox),
		w.Symlink("/bin/sh", "busybox"),
		w.Symlink("/bin/poweroff", "busybox"),
		w.File("/init", 0o755, []byte(bareInit)),
		w.Close(),
		f.Close(),
	)
	if err := errors.Join(errs...); err != nil {
		return "", err
	}
	return path, nil
}

// checkStaticBusybox refuses a busybox that needs a dynamic loader, which
// an initramfs lacks.
func checkStaticBusybox() error {
	f, err := elf.Open(busybox)
	if err != nil {
		return fmt.Errorf("%s: %w (install Debian's busybox-static; bench/guest.sh does)", busybox, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is linked dynamically; the bare boot needs busybox-static's", busybox)
		}
	}
	return nil
}

// bareBoot is one bare boot's figures, from QEMU's process start.
type bareBoot struct {
	kernel   time.Duration // markKernel on the console
	initLine time.Duration // markInit on the console
	exit     time.Duration // QEMU has exited: the guest powered off
}

// bootBare runs QEMU with kernel and initrd on the console's stdio, with the
// accelerator, memory and vCPUs the boxes get, until the guest powers off.
func bootBare(ctx context.Context, accel, kernel, initrd string, mem int64, cpus int, limit time.Duration) (bareBoot, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-accel", accel,
		"-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
		"-m", strconv.FormatInt(mem>>20, 10)+"M",
		"-smp", strconv.Itoa(cpus),
		"-kernel", kernel, "-initrd", initrd, "-append", bareCmdline,
		"-serial", "stdio")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out lockedBuffer
	cmd.Stderr = &out
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return bareBoot{}, err
	}
	k := newMarks(markKernel, markInit)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return bareBoot{}, fmt.Errorf("qemu-system-x86_64: %w", err)
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		buf := make([]byte, 4096)
		for {
			n, err := stdout.Read(buf)
			if n > 0 {
				now := time.Now()
				_, _ = out.Write(buf[:n])
				k.see(out.Bytes(), now)
			}
			if err != nil {
				return
			}
		}
	}()
	<-read // the pipe closes when QEMU exits
	err = cmd.Wait()
	exited := time.Now()
	switch {
	case ctx.Err() != nil:
		return bareBoot{}, fmt.Errorf("the bare boot did not power off within %v; console:\n%s", limit, tail(out.Bytes(), 12))
	case err != nil:
		return bareBoot{}, fmt.Errorf("the bare boot: QEMU: %w; output:\n%s", err, tail(out.Bytes(), 12))
	}
	at := k.since(start)
	if at[0] == 0 || at[1] == 0 {
		return bareBoot{}, fmt.Errorf("the bare boot powered off without the lines %q and %q on its console:\n%s", markKernel, markInit, tail(out.Bytes(), 12))
	}
	return bareBoot{kernel: at[0], initLine: at[1], exit: exited.Sub(start)}, nil
}

// lockedBuffer collects output written from more than one goroutine.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	lines := bytes.Split(bytes.TrimRight(b, "\r\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
