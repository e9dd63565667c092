package qemu

import (
	"syscall"
	"testing"
	"time"
)

// kmsg gives one record per Read, as /dev/kmsg does, then errEnd.
type kmsg struct {
	records []string
	errEnd  error
}

func (k *kmsg) Read(p []byte) (int, error) {
	if len(k.records) == 0 {
		return 0, k.errEnd
	}
	r := k.records[0]
	k.records = k.records[1:]
	if r == "EPIPE" {
		return 0, syscall.EPIPE
	}
	return copy(p, r), nil
}

func TestKmsgNamesOOMVictim(t *testing.T) {
	for _, tc := range []struct {
		name    string
		records []string
		want    oomKill
	}{
		{"global OOM", []string{
			"6,1,10,-;boxd: something",
			"3,2,20,-;Out of memory: Killed process 4242 (qemu-system-x86) total-vm:1000kB, anon-rss:10kB",
		}, oomHost},
		{"memory cgroup", []string{"3,5,20,-;Memory cgroup out of memory: Killed process 4242 (qemu-system-x86)"}, oomCgroup},
		{"another process", []string{"3,2,20,-;Out of memory: Killed process 42421 (other)"}, oomNone},
		{"killed, not for memory", []string{"6,2,20,-;Killed process 4242 (qemu-system-x86)"}, oomNone},
		{"overwritten records first", []string{"EPIPE", "3,9,20,-;Out of memory: Killed process 4242 (qemu)"}, oomHost},
		{"empty log", nil, oomNone},
		{"before the process started: another of that pid", []string{"3,2,10,-;Out of memory: Killed process 4242 (qemu)"}, oomNone},
	} {
		if got := kmsgNamesOOMVictim(&kmsg{records: tc.records, errEnd: syscall.EAGAIN}, 4242, 15*time.Microsecond); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// The real kernel log is read to its end without waiting for more.
func TestOOMKilledReturns(t *testing.T) {
	done := make(chan oomKill, 1)
	go func() { done <- oomKilled(1<<30, 0) }() // no such process was ever killed
	select {
	case got := <-done:
		if got != oomNone {
			t.Fatal("a process that never existed reads as OOM-killed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reading the kernel log did not return at its end")
	}
}
