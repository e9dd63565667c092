package qemu

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/memstore"
)

// uffdChildEnv makes the test binary the process TestGrabDirectRAM takes a
// userfaultfd from: "FILE UFFDS" maps FILE shared and registers it with
// the first of UFFDS userfaultfds.
const uffdChildEnv = "BOXD_TEST_UFFD_CHILD"

// uffdChild maps the file, opens the userfaultfds, says "ready", and on a
// line with a page count N prints the SHA-256 of the first N pages as
// read through its mapping (which hangs on a page no one placed).
func uffdChild(spec string) {
	file, n, _ := strings.Cut(spec, " ")
	uffds, _ := strconv.Atoi(n)
	fail := func(err error) { fmt.Println("error:", err); os.Exit(1) }
	f, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		fail(err)
	}
	st, err := f.Stat()
	if err != nil {
		fail(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		fail(err)
	}
	for i := range uffds {
		u, err := uffd.New()
		if err != nil {
			fail(err)
		}
		if i == 0 {
			if err := u.Register(uffd.Addr(mem), uintptr(len(mem))); err != nil {
				fail(err)
			}
		}
	}
	fmt.Println("ready")
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	pages, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		fail(err)
	}
	sum := sha256.Sum256(mem[:pages*memstore.PageSize])
	fmt.Println(hex.EncodeToString(sum[:]))
	os.Exit(0)
}

// grabDirectRAM takes the one userfaultfd of another process and places
// pages into that process's mapping through it, which the process then
// reads; a process with none, or with two, is refused.
func TestGrabDirectRAM(t *testing.T) {
	if spec := os.Getenv(uffdChildEnv); spec != "" {
		uffdChild(spec)
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("userfaultfd and pidfd_getfd need root here")
	}
	const pages = 16
	for _, tc := range []struct {
		uffds int
		want  string // an error that grabDirectRAM must return; "" for none
	}{
		{1, ""},
		{0, "holds no userfaultfd"},
		{2, "more than one userfaultfd"},
	} {
		t.Run(fmt.Sprintf("%d userfaultfds", tc.uffds), func(t *testing.T) {
			dir, err := os.MkdirTemp("/dev/shm", "boxd-directram-test-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			file := filepath.Join(dir, "guest.mem")
			if err := os.WriteFile(file, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(file, pages*memstore.PageSize); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestGrabDirectRAM$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d", uffdChildEnv, file, tc.uffds))
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
			out := bufio.NewReader(stdout)
			if line, err := out.ReadString('\n'); err != nil || line != "ready\n" {
				t.Fatalf("the child said %q (%v)", line, err)
			}
			d, err := grabDirectRAM(cmd.Process.Pid, file, pages*memstore.PageSize)
			if tc.want != "" {
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("grabDirectRAM: %v, want an error saying %q", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer d.close()
			data := make([]byte, pages*memstore.PageSize)
			for p := range pages {
				copy(data[p*memstore.PageSize:], bytes.Repeat([]byte{byte(p + 1)}, memstore.PageSize))
			}
			// A run, then its last page again: refused.
			if err := d.place(0, data[:8*memstore.PageSize]); err != nil {
				t.Fatal(err)
			}
			if err := d.place(7, data[7*memstore.PageSize:8*memstore.PageSize]); err == nil || !strings.Contains(err.Error(), errPlacedAlready.Error()) {
				t.Fatalf("placing a page twice: %v, want %v", err, errPlacedAlready)
			}
			if err := d.place(8, data[8*memstore.PageSize:]); err != nil {
				t.Fatal(err)
			}
			if err := d.place(pages, data[:memstore.PageSize]); err == nil {
				t.Fatal("placing a page past the end of guest RAM worked")
			}
			fmt.Fprintln(stdin, pages)
			line, err := out.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			want := sha256.Sum256(data)
			if got := strings.TrimSpace(line); got != hex.EncodeToString(want[:]) {
				t.Fatalf("the child read %s through its mapping, want %x", got, want)
			}
		})
	}
}

// streamPages records the pages each write of the stream carries (one
// write is one batch: the writer's buffer holds a whole batch and each
// batch ends with a flush).
type streamPages struct {
	mu    sync.Mutex
	pages map[int]int // page → times sent
}

func (w *streamPages) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(b) < 5 || b[0] != vmSectionPart {
		return len(b), nil
	}
	at := 5
	for at+8 <= len(b) {
		v := binary.BigEndian.Uint64(b[at:])
		at += 8
		if v&ramFlagEOS != 0 {
			break
		}
		if v&ramFlagContinue == 0 {
			at += 1 + int(b[at]) // the block's name
		}
		if v&ramFlagZero != 0 {
			at++
		} else {
			at += migrationPage
		}
		w.pages[int(v/migrationPage)]++
	}
	return len(b), nil
}

// Once there is guest RAM to place pages in (directRAM), the pages asked
// for and the push of the rest are placed there; before, they went through
// the stream. Each page that holds data goes one way, once, the pages
// placed are the snapshot's, and a zero page goes only when asked for.
func TestLazyPlacesDirectly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("userfaultfd needs root here")
	}
	const pages = 256
	var mem bytes.Buffer
	for p := range pages {
		page := make([]byte, memstore.PageSize)
		if p%4 != 3 { // every fourth page holds zeros
			page = testPage(p)
		}
		mem.Write(page)
	}
	g, plan := lazySnapshot(t, mem.Bytes())
	rec := &streamPages{pages: map[int]int{}}
	l := testLazyMemory(t, &Runner{Graph: g}, plan, pages, rec)

	// Guest RAM: a shared memory file, mapped and registered here.
	fd, err := unix.MemfdCreate("boxd-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	ramFile := os.NewFile(uintptr(fd), "guest-ram")
	defer ramFile.Close()
	if err := ramFile.Truncate(pages * memstore.PageSize); err != nil {
		t.Fatal(err)
	}
	ram, err := unix.Mmap(fd, 0, pages*memstore.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(ram)
	u, err := uffd.New()
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Register(uffd.Addr(ram), uintptr(len(ram))); err != nil {
		t.Fatal(err)
	}
	ask := func(p int) {
		l.reqs <- rpMessage{typ: rpReqPagesID, block: guestRAMBlockStr, start: uint64(p) * memstore.PageSize, length: memstore.PageSize}
	}
	finished := make(chan struct{})
	go func() { l.write(); close(finished) }()
	// Requests before the userfaultfd is there go through the stream, with
	// their windows; one for a zero page gets a zero record.
	streamed := []int{10, 100, 203}
	for _, p := range streamed {
		ask(p)
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		rec.mu.Lock()
		n := rec.pages[203]
		rec.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the requests were not answered")
		}
		time.Sleep(time.Millisecond)
	}
	if !l.useDirect(&directRAM{fd: u, base: uffd.Addr(ram), size: int64(len(ram))}) {
		t.Fatal("useDirect refused before the writer ended")
	}
	// Requests after it are placed: a page with data, a zero page.
	placedAsked := []int{57, 207}
	for _, p := range placedAsked {
		ask(p)
	}
	l.guestRuns()
	select {
	case <-finished:
	case <-l.done:
		t.Fatalf("the restore failed: %v", l.err)
	case <-time.After(30 * time.Second):
		t.Fatal("the push did not end")
	}
	if l.err != nil {
		t.Fatalf("the restore failed: %v", l.err)
	}
	if l.useDirect(&directRAM{fd: u}) || l.direct.Load() != nil {
		t.Fatal("the writer ended and still holds a directRAM")
	}

	placed := 0
	got := make([]byte, memstore.PageSize)
	for p := range pages {
		if _, err := ramFile.ReadAt(got, int64(p)*memstore.PageSize); err != nil {
			t.Fatal(err)
		}
		want := mem.Bytes()[p*memstore.PageSize : (p+1)*memstore.PageSize]
		inRAM := bytes.Equal(got, want)
		if !inRAM && !bytes.Equal(got, make([]byte, memstore.PageSize)) {
			t.Fatalf("page %d in guest RAM is neither the snapshot's nor a hole", p)
		}
		sent := rec.pages[p]
		switch {
		case p%4 == 3 && p != 203:
			if sent != 0 {
				t.Errorf("zero page %d went through the stream %d times; it was not asked for before the userfaultfd came", p, sent)
			}
		case p%4 == 3:
			if sent != 1 {
				t.Errorf("zero page %d, asked for, went through the stream %d times, want once", p, sent)
			}
		case sent+b2i(inRAM) != 1:
			t.Errorf("page %d: sent %d times through the stream, placed: %v; want one of the two, once", p, sent, inRAM)
		case inRAM:
			placed++
		}
	}
	for _, p := range streamed {
		if rec.pages[p] != 1 {
			t.Errorf("page %d was asked for before the userfaultfd came and went through the stream %d times, want once", p, rec.pages[p])
		}
	}
	for _, p := range placedAsked {
		if rec.pages[p] != 0 {
			t.Errorf("page %d was asked for once the userfaultfd was there and went through the stream %d times, want none", p, rec.pages[p])
		}
	}
	if z := l.stats.zeroed.Load(); z != 2 {
		t.Errorf("%d zero pages delivered, want the 2 asked for", z)
	}
	if placed == 0 || l.stats.placed.Load() != int64(placed) {
		t.Errorf("%d pages found placed, the stats say %d", placed, l.stats.placed.Load())
	}
	t.Logf("%d pages placed, %d through the stream", placed, len(rec.pages))
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
