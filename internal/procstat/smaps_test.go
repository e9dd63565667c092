package procstat

import (
	"os"
	"testing"
)

// The smaps_rollup of a QEMU (128 MiB of guest memory in a file on
// /dev/shm, running its firmware) on Linux 6.18.
const qemuRollup = `5642d8e2c000-7ffcd8d37000 ---p 00000000 00:00 0                          [rollup]
Rss:               45992 kB
Pss:               34256 kB
Pss_Dirty:         23356 kB
Pss_Anon:          20896 kB
Pss_File:          10896 kB
Pss_Shmem:          2464 kB
Shared_Clean:      22208 kB
Shared_Dirty:          0 kB
Private_Clean:       428 kB
Private_Dirty:     23356 kB
Referenced:        45992 kB
Anonymous:         20896 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:      8192 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
`

func TestParseRollup(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		want Rollup
		bad  bool
	}{
		{"qemu", qemuRollup, Rollup{RSS: 45992 << 10, PSS: 34256 << 10}, false},
		// Kernels before 5.x have no Pss_Anon and the like.
		{"old kernel", "00400000-7fff ---p 00000000 00:00 0   [rollup]\nRss:  8 kB\nPss:  5 kB\nShared_Clean: 3 kB\n", Rollup{RSS: 8 << 10, PSS: 5 << 10}, false},
		{"keys alike but not the same", "Rss: 4 kB\nPss_Anon: 9 kB\nPss: 2 kB\nSwapPss: 7 kB\n", Rollup{RSS: 4 << 10, PSS: 2 << 10}, false},
		{"a process with no memory", "Rss: 0 kB\nPss: 0 kB\n", Rollup{}, false},
		{"empty", "", Rollup{}, true},
		{"no Pss", "Rss: 8 kB\nPss_Anon: 5 kB\n", Rollup{}, true},
		{"not kB", "Rss: 8 MB\nPss: 5 kB\n", Rollup{}, true},
		{"not a number", "Rss: 8 kB\nPss: x kB\n", Rollup{}, true},
		{"negative", "Rss: 8 kB\nPss: -5 kB\n", Rollup{}, true},
	} {
		got, err := parseRollup([]byte(tc.in))
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("%s: %+v, %v; want %+v (error %v)", tc.name, got, err, tc.want, tc.bad)
		}
	}
}

// This process has memory of its own: some of it resident, PSS no more
// than RSS.
func TestMemoryRollupOfSelf(t *testing.T) {
	r, err := MemoryRollup(os.Getpid())
	if err != nil || r.RSS <= 0 || r.PSS <= 0 || r.PSS > r.RSS {
		t.Fatalf("MemoryRollup of this process: %+v, %v", r, err)
	}
	if _, err := MemoryRollup(-1); err == nil {
		t.Fatal("MemoryRollup of no process succeeded")
	}
}
