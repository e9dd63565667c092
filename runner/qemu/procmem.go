package qemu

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/cespare/xxhash/v2"

	"github.com/boxd-dev/boxd/memstore"
)

// Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
const (
	pagemapFilePage = 1 << 61
	pagemapSwapped  = 1 << 62
	pagemapPresent  = 1 << 63
)

// guestRAM is QEMU's mapping of guest memory, read through /proc/PID/mem.
type guestRAM struct {
	pid  int
	base uint64 // the mapping's first address in QEMU
	size int64
}

// findGuestRAM finds the mapping of file (size bytes) in process pid.
func findGuestRAM(pid int, file string, size int64) (guestRAM, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return guestRAM{}, fmt.Errorf("qemu: guest memory mapping: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || strings.Join(fields[5:], " ") != file {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || int64(end-start) != size {
			continue
		}
		return guestRAM{pid: pid, base: start, size: size}, nil
	}
	if err := sc.Err(); err != nil {
		return guestRAM{}, fmt.Errorf("qemu: guest memory mapping: %w", err)
	}
	return guestRAM{}, fmt.Errorf("qemu: no mapping of %s (%d bytes) in QEMU %d", file, size, pid)
}

// open returns the guest memory as an io.ReaderAt over /proc/PID/mem.
func (g guestRAM) open() (*os.File, io.ReaderAt, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", g.pid))
	if err != nil {
		return nil, nil, fmt.Errorf("qemu: guest memory: %w", err)
	}
	return f, io.NewSectionReader(f, int64(g.base), g.size), nil
}

// pages reads the pagemap entries of the mapping and returns the pages
// for which keep says yes.
func (g guestRAM) pages(keep func(entry uint64) bool) (memstore.Bitmap, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", g.pid))
	if err != nil {
		return nil, fmt.Errorf("qemu: pagemap: %w", err)
	}
	defer f.Close()
	n := int(g.size / memstore.PageSize)
	bm := memstore.NewBitmap(n)
	const batch = 1 << 15 // entries per read
	buf := make([]byte, batch*8)
	for first := 0; first < n; first += batch {
		cnt := min(batch, n-first)
		b := buf[:cnt*8]
		if _, err := f.ReadAt(b, int64(g.base/memstore.PageSize+uint64(first))*8); err != nil {
			return nil, fmt.Errorf("qemu: pagemap: %w", err)
		}
		for i := range cnt {
			if keep(binary.LittleEndian.Uint64(b[i*8:])) {
				bm.Set(first + i)
			}
		}
	}
	return bm, nil
}

// private returns the pages the process holds as its own copies (a
// private mapping's written pages, in memory or swapped out), which its
// memory file does not have.
func (g guestRAM) private() (memstore.Bitmap, error) {
	return g.pages(func(e uint64) bool {
		return e&pagemapSwapped != 0 || e&pagemapPresent != 0 && e&pagemapFilePage == 0
	})
}

// pageSums finds the pages changed since it last looked by keeping a
// seeded 64-bit hash of every page. The host kernel's soft-dirty bits
// would be cheaper, but kernels built without CONFIG_MEM_SOFT_DIRTY (this
// project's hosts among them) never set them, and QEMU under TCG has no
// dirty log to ask. The seed is random per machine, so a guest cannot
// aim a page at a collision; a collision by chance (2^-64 a page) would
// keep a stale page in the snapshot.
type pageSums struct {
	seed uint64
	sums []uint64 // 0: not known
}

func newPageSums(pages int) *pageSums {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return &pageSums{seed: binary.LittleEndian.Uint64(b[:]) | 1, sums: make([]uint64, pages)}
}

// changed reads the candidate pages of src (all when nil) and returns
// those whose content differs from when it last read them (or that it
// never read), and keep, which remembers the new sums: call it once the
// snapshot that stores the changed pages is committed, so that a snapshot
// that fails leaves the pages changed for the next one.
func (p *pageSums) changed(src io.ReaderAt, candidates memstore.Bitmap) (changed memstore.Bitmap, keep func(), err error) {
	n := len(p.sums)
	next := slices.Clone(p.sums)
	out := memstore.NewBitmap(n)
	const run = 256 // pages per read
	type item struct{ first, count int }
	work := make(chan item, 8)
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for range 2 {
		wg.Go(func() {
			buf := make([]byte, run*memstore.PageSize)
			d := xxhash.NewWithSeed(p.seed)
			for it := range work {
				b := buf[:it.count*memstore.PageSize]
				if _, err := src.ReadAt(b, int64(it.first)*memstore.PageSize); err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					for range work {
					}
					return
				}
				for i := range it.count {
					d.ResetWithSeed(p.seed)
					_, _ = d.Write(b[i*memstore.PageSize : (i+1)*memstore.PageSize])
					sum := d.Sum64()
					if pg := it.first + i; sum != p.sums[pg] || sum == 0 {
						next[pg] = sum
						mu.Lock()
						out.Set(pg)
						mu.Unlock()
					}
				}
			}
		})
	}
	for first := 0; first < n; {
		if candidates != nil && !candidates.Has(first) {
			first++
			continue
		}
		count := 1
		for first+count < n && count < run && (candidates == nil || candidates.Has(first+count)) {
			count++
		}
		work <- item{first, count}
		first += count
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return nil, nil, fmt.Errorf("qemu: reading guest memory: %w", err)
	default:
	}
	return out, func() { p.sums = next }, nil
}

// dataPages returns the pages of a memory file that hold data (tmpfs
// answers SEEK_DATA and SEEK_HOLE; a file system that does not reports
// every page).
func dataPages(file string, size int64) (memstore.Bitmap, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("qemu: memory file: %w", err)
	}
	defer f.Close()
	bm := memstore.NewBitmap(int(size / memstore.PageSize))
	for off := int64(0); off < size; {
		start, err := seekData(f, off)
		if err != nil {
			return nil, err
		}
		if start < 0 || start >= size {
			break
		}
		end, err := seekHole(f, start)
		if err != nil {
			return nil, err
		}
		end = min(end, size)
		for p := start / memstore.PageSize; p*memstore.PageSize < end; p++ {
			bm.Set(int(p))
		}
		off = end
	}
	return bm, nil
}
