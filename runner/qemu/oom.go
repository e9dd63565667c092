package qemu

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
)

// oomKilled says whether the kernel log names process pid as the OOM
// killer's victim, reading /dev/kmsg (root only) from its start; false
// where it cannot tell.
func oomKilled(pid int) bool {
	f, err := os.OpenFile("/dev/kmsg", os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	return kmsgNamesOOMVictim(f, pid)
}

// kmsgNamesOOMVictim reads kernel log records from r (one per read, as
// /dev/kmsg gives them, "PRIO,SEQ,TIME,FLAGS;MESSAGE") until it ends and
// says whether one reports pid killed for lack of memory: "Out of memory:
// Killed process PID (...)" or "Memory cgroup out of memory: Killed process
// PID (...)".
func kmsgNamesOOMVictim(r io.Reader, pid int) bool {
	want := []byte("killed process " + strconv.Itoa(pid) + " (")
	buf := make([]byte, 8192)
	for {
		n, err := r.Read(buf)
		if rec := bytes.ToLower(buf[:n]); bytes.Contains(rec, []byte("out of memory")) && bytes.Contains(rec, want) {
			return true
		}
		if errors.Is(err, syscall.EPIPE) { // records overwritten while reading: read on
			continue
		}
		if err != nil || n == 0 {
			return false
		}
	}
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
