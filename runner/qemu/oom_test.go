package qemu

import (
	"syscall"
	"testing"
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
		want    bool
	}{
		{"global OOM", []string{
			"6,1,10,-;boxd: something",
			"3,2,20,-;Out of memory: Killed process 4242 (qemu-system-x86) total-vm:1000kB, anon-rss:10kB",
		}, true},
		{"memory cgroup", []string{"3,5,20,-;Memory cgroup out of memory: Killed process 4242 (qemu-system-x86)"}, true},
		{"another process", []string{"3,2,20,-;Out of memory: Killed process 42421 (other)"}, false},
		{"killed, not for memory", []string{"6,2,20,-;Killed process 4242 (qemu-system-x86)"}, false},
		{"overwritten records first", []string{"EPIPE", "3,9,20,-;Out of memory: Killed process 4242 (qemu)"}, true},
		{"empty log", nil, false},
	} {
		if got := kmsgNamesOOMVictim(&kmsg{records: tc.records, errEnd: syscall.EAGAIN}, 4242); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
