package qemu

import (
	"bytes"
	"errors"
	"io"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// oomKill is what the kernel log says of a process's end.
type oomKill int

const (
	oomNone   oomKill = iota // not an OOM kill, or the log cannot tell
	oomHost                  // the host ran out of memory
	oomCgroup                // the process's memory cgroup reached its limit
)

// oomKilled says whether the kernel log names process pid as the OOM
// killer's victim since since (CLOCK_MONOTONIC, as the log's time stamps;
// an older record is another process of that pid), reading /dev/kmsg (root
// only), and for which lack of memory; oomNone where it cannot tell.
func oomKilled(pid int, since time.Duration) oomKill {
	// A raw non-blocking descriptor: read returns EAGAIN at the log's end
	// (an *os.File would wait in the poller for more records).
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return oomNone
	}
	defer syscall.Close(fd)
	return kmsgNamesOOMVictim(rawReader(fd), pid, since)
}

// rawReader reads a descriptor with read(2), as it is.
type rawReader int

func (r rawReader) Read(p []byte) (int, error) {
	n, err := syscall.Read(int(r), p)
	if n < 0 {
		n = 0
	}
	return n, err
}

// kmsgNamesOOMVictim reads kernel log records from r (one per read, as
// /dev/kmsg gives them, "PRIO,SEQ,TIME,FLAGS;MESSAGE", TIME in
// microseconds) until it ends and says whether one stamped at since or
// later reports pid killed for lack of memory: "Out of memory: Killed
// process PID (...)" (oomHost) or "Memory cgroup out of memory: Killed
// process PID (...)" (oomCgroup).
func kmsgNamesOOMVictim(r io.Reader, pid int, since time.Duration) oomKill {
	want := []byte("killed process " + strconv.Itoa(pid) + " (")
	buf := make([]byte, 8192)
	for {
		n, err := r.Read(buf)
		if rec := bytes.ToLower(buf[:n]); bytes.Contains(rec, []byte("out of memory")) && bytes.Contains(rec, want) && stampedSince(rec, since) {
			if bytes.Contains(rec, []byte("memory cgroup out of memory")) {
				return oomCgroup
			}
			return oomHost
		}
		if errors.Is(err, syscall.EPIPE) { // records overwritten while reading: read on
			continue
		}
		if err != nil || n == 0 {
			return oomNone
		}
	}
}

// stampedSince says whether a kmsg record's time stamp (its third field)
// is since or later.
func stampedSince(rec []byte, since time.Duration) bool {
	head, _, _ := bytes.Cut(rec, []byte(";"))
	f := bytes.Split(head, []byte(","))
	if len(f) < 3 {
		return false
	}
	us, err := strconv.ParseInt(string(f[2]), 10, 64)
	return err == nil && time.Duration(us)*time.Microsecond >= since
}

// monotonicNow is CLOCK_MONOTONIC now, the clock of the kernel log's time
// stamps.
func monotonicNow() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// killedBySignal says whether err is a process's exit by SIGKILL.
func killedBySignal(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}
