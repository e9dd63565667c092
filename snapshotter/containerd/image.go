package containerd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// makeImage writes a fresh, sparse ext4 image of size bytes at path (under a
// temporary name, renamed into place), with an empty root.
func (s *Snapshotter) makeImage(ctx context.Context, path string, size int64) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return fmt.Errorf("creating an image: %w", err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			os.Remove(tmp)
		}
	}()
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sizing an image of %d bytes: %w", size, err)
	}
	// 4 KiB blocks, so that a filesystem block is a chunk; no zeroing of
	// the inode tables and journal: the file's holes read zero already.
	out, err := exec.CommandContext(ctx, s.mkfs, "-q", "-F", "-t", FSType, "-b", "4096",
		"-E", "lazy_itable_init=1,lazy_journal_init=1", tmp).CombinedOutput()
	if err != nil {
		return fmt.Errorf("formatting an image of %d bytes: %w: %s", size, err, strings.TrimSpace(string(out)))
	}
	// containerd expects a new snapshot's root to be empty.
	if err := s.runDebugfs(ctx, tmp, "rmdir lost+found", "-w"); err != nil {
		return fmt.Errorf("removing lost+found from a new image: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming a new image into place: %w", err)
	}
	ok = true
	return nil
}

// exportImage writes the filesystem of graph snapshot gname (containerd's
// committed snapshot parent) to path, zero blocks as holes.
func (s *Snapshotter) exportImage(ctx context.Context, gname, parent, path string) error {
	r, err := s.g.OpenMap(gname, MapName)
	if errors.Is(err, errdefs.ErrNotFound) {
		return fmt.Errorf("the store has no image %s/%s of committed snapshot %q: %w", gname, MapName, parent, errdefs.ErrDataLoss)
	}
	if err != nil {
		return fmt.Errorf("parent %q: %w", parent, err)
	}
	if err := r.Export(ctx, path, nil); err != nil {
		return fmt.Errorf("writing the image of parent %q: %w", parent, err)
	}
	return nil
}

// ext4 superblock fields (offsets within the superblock, which starts at
// byte 1024).
const (
	ext4SuperOffset    = 1024
	ext4MagicOffset    = 0x38
	ext4Magic          = 0xEF53
	ext4IncompatOffset = 0x60
	// ext4IncompatRecover is set while the filesystem is mounted (and
	// after a crash, until its journal is replayed).
	ext4IncompatRecover = 0x4
)

// unmountSettle is how long checkUnmounted waits for a filesystem just
// unmounted to reach its image: the loop device it was mounted through
// writes the final superblock to the file after umount returns, and is
// torn down asynchronously.
const unmountSettle = 2 * time.Second

// checkUnmounted refuses an image whose filesystem is mounted or was not
// unmounted cleanly: its blocks are not a consistent filesystem.
func checkUnmounted(f *os.File) error {
	deadline := time.Now().Add(unmountSettle)
	for {
		var sb [ext4IncompatOffset + 4]byte
		if _, err := f.ReadAt(sb[:], ext4SuperOffset); err != nil {
			return fmt.Errorf("reading the image's superblock: %w", err)
		}
		if binary.LittleEndian.Uint16(sb[ext4MagicOffset:]) != ext4Magic {
			return fmt.Errorf("the image holds no ext4 filesystem: %w", errdefs.ErrFailedPrecondition)
		}
		if binary.LittleEndian.Uint32(sb[ext4IncompatOffset:])&ext4IncompatRecover == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the image's filesystem is mounted or was not unmounted cleanly; unmount it first: %w", errdefs.ErrFailedPrecondition)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// openImage opens the image of an active snapshot.
func openImage(path string) (*os.File, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("image %s is missing: %w", path, errdefs.ErrDataLoss)
	}
	return f, err
}

// ingest stores the image at path as graph snapshot name, a delta against
// graph snapshot parent ("" for none), and returns the size of the blocks
// that differ from the parent's and are not zero.
func (s *Snapshotter) ingest(ctx context.Context, path, name, parent, ctrName string) (snapshots.Usage, error) {
	f, err := openImage(path)
	if err != nil {
		return snapshots.Usage{}, err
	}
	defer f.Close()
	if err := checkUnmounted(f); err != nil {
		return snapshots.Usage{}, err
	}
	st, err := f.Stat()
	if err != nil {
		return snapshots.Usage{}, err
	}
	size := st.Size()
	var pr *snapshotter.MapReader
	if parent != "" {
		if pr, err = s.g.OpenMap(parent, MapName); err != nil {
			return snapshots.Usage{}, fmt.Errorf("parent's image: %w", err)
		}
	}
	draft, err := s.g.NewDraft(parent)
	if err != nil {
		return snapshots.Usage{}, err
	}
	defer draft.Abort()
	if err := draft.SetSize(MapName, snapshotter.KindDisk, size); err != nil {
		return snapshots.Usage{}, err
	}
	parentID := func(n uint64) cas.ID {
		if pr == nil {
			return cas.ZeroID
		}
		return pr.Block(n)
	}
	var regions []blockRange
	var same []bool
	var nums []uint64
	var changed []byte
	err = eachDataRun(ctx, f, size, func(r blockRange) { regions = append(regions, r) }, func(n0 uint64, run []byte) error {
		same = sameAsParent(pr, n0, run, same)
		// The blocks that changed go to the store in one batch, hashed
		// and compressed on every core.
		nums, changed = nums[:0], changed[:0]
		for i := 0; i*cas.ChunkSize < len(run); i++ {
			b := run[i*cas.ChunkSize : min((i+1)*cas.ChunkSize, len(run))]
			n := n0 + uint64(i)
			if same[i] || isZero(b) && parentID(n) == cas.ZeroID {
				continue
			}
			nums = append(nums, n)
			changed = append(changed, b...)
			changed = append(changed, make([]byte, cas.ChunkSize-len(b))...)
		}
		if len(nums) == 0 {
			return nil
		}
		_, err := draft.WriteBlocks(ctx, MapName, snapshotter.KindDisk, nums, bytes.NewReader(changed))
		return err
	})
	if err != nil {
		return snapshots.Usage{}, err
	}
	if pr != nil {
		// A parent block where the image has a hole is zero now.
		var zero [cas.ChunkSize]byte
		limit := uint64((size + cas.ChunkSize - 1) / cas.ChunkSize)
		i := 0
		err = pr.Each(func(n uint64, _ cas.ID) error {
			if n >= limit {
				return nil
			}
			for i < len(regions) && regions[i].end <= n {
				i++
			}
			if i < len(regions) && regions[i].first <= n {
				return nil
			}
			return draft.WriteBlock(MapName, snapshotter.KindDisk, n, zero[:min(cas.ChunkSize, size-int64(n)*cas.ChunkSize)])
		})
		if err != nil {
			return snapshots.Usage{}, err
		}
	}
	if size%cas.ChunkSize != 0 {
		// A short last block written whole grew the map to a block.
		if err := draft.SetSize(MapName, snapshotter.KindDisk, size); err != nil {
			return snapshots.Usage{}, err
		}
	}
	if _, err := draft.Commit(name, map[string]string{LabelName: ctrName}); err != nil {
		return snapshots.Usage{}, err
	}
	cr, err := s.g.OpenMap(name, MapName)
	if err != nil {
		return snapshots.Usage{}, err
	}
	var u snapshots.Usage
	err = cr.Each(func(n uint64, id cas.ID) error {
		if id != parentID(n) {
			u.Size += cas.ChunkSize
		}
		return nil
	})
	return u, err
}

// imageUsage returns the size of the non-zero blocks of the image at path
// that differ from graph snapshot parent's ("" for none).
func (s *Snapshotter) imageUsage(ctx context.Context, path, parent string) (int64, error) {
	f, err := openImage(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	var pr *snapshotter.MapReader
	if parent != "" {
		if pr, err = s.g.OpenMap(parent, MapName); err != nil {
			return 0, fmt.Errorf("parent's image: %w", err)
		}
	}
	var size int64
	var same []bool
	err = eachDataRun(ctx, f, st.Size(), nil, func(n0 uint64, run []byte) error {
		same = sameAsParent(pr, n0, run, same)
		for i := 0; i*cas.ChunkSize < len(run); i++ {
			if !same[i] && !isZero(run[i*cas.ChunkSize:min((i+1)*cas.ChunkSize, len(run))]) {
				size += cas.ChunkSize
			}
		}
		return nil
	})
	return size, err
}

// sameAsParent sets same[i] (reusing same's room) to whether block n0+i,
// the i-th block of run, is a non-zero block equal to the parent's. It
// hashes on every CPU: an image made from its parent is mostly the parent's
// blocks, and hashing them is most of a Commit's work.
func sameAsParent(pr *snapshotter.MapReader, n0 uint64, run []byte, same []bool) []bool {
	blocks := (len(run) + cas.ChunkSize - 1) / cas.ChunkSize
	same = slices.Grow(same[:0], blocks)[:blocks]
	clear(same)
	if pr == nil {
		return same
	}
	workers := min(runtime.GOMAXPROCS(0), blocks)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < blocks; i += workers {
				if id := pr.Block(n0 + uint64(i)); id != cas.ZeroID {
					same[i] = cas.Sum(run[i*cas.ChunkSize:min((i+1)*cas.ChunkSize, len(run))]) == id
				}
			}
		})
	}
	wg.Wait()
	return same
}

// blockRange is the blocks [first, end).
type blockRange struct{ first, end uint64 }

// eachDataRun calls fn with the allocated parts of f's first size bytes
// (holes read zero and are skipped), in order, as runs of whole blocks of at
// most 1 MiB starting at block n0; only the file's last block may be short.
// run is reused after fn returns. region, when not nil, is called first with
// each allocated region.
func eachDataRun(ctx context.Context, f *os.File, size int64, region func(blockRange), fn func(n0 uint64, run []byte) error) error {
	const bs = cas.ChunkSize
	buf := make([]byte, 1<<20)
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole from off on
		}
		hole := size
		if err != nil {
			data = off // no SEEK_DATA here: all of it is data
		} else if h, err := unix.Seek(fd, data, unix.SEEK_HOLE); err == nil {
			hole = h
		}
		start := data &^ (bs - 1)
		end := min((hole+bs-1)&^(bs-1), size)
		if start >= end {
			break
		}
		if region != nil {
			region(blockRange{uint64(start / bs), uint64((end + bs - 1) / bs)})
		}
		for pos := start; pos < end; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := int(min(int64(len(buf)), end-pos))
			got, err := f.ReadAt(buf[:n], pos)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("reading the image: %w", err)
			}
			clear(buf[got:n]) // the file shrank under us: read zero
			if err := fn(uint64(pos/bs), buf[:n]); err != nil {
				return err
			}
			pos += int64(n)
		}
		off = end
	}
	return nil
}

var zeroBlock [cas.ChunkSize]byte

func isZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }

// runDebugfs runs debugfs's request on image, with extra flags first.
func (s *Snapshotter) runDebugfs(ctx context.Context, image, request string, flags ...string) error {
	args := append(slices.Clone(flags), "-R", request, image)
	out, err := exec.CommandContext(ctx, s.debugfs, args...).CombinedOutput()
	if err == nil {
		// debugfs exits 0 when its request fails; anything but its banner
		// is an error.
		for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
			if line != "" && !strings.HasPrefix(line, "debugfs ") {
				err = errors.New(line)
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("debugfs %s: %w: %s", request, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ExtractSource writes the files of the root file system at source (the
// Source of a mount from Prepare, View or Mounts) into dir, an empty
// folder, as they are in the image (modes, owners, links), reading the
// image with debugfs: it is never mounted. Special files are skipped.
func (s *Snapshotter) ExtractSource(ctx context.Context, source, dir string) error {
	src, err := s.SnapshotForSource(ctx, source)
	if err != nil {
		return err
	}
	if strings.ContainsAny(dir, "\"\n") {
		return fmt.Errorf("folder %q: %w", dir, errdefs.ErrInvalidArgument)
	}
	if err := s.runDebugfs(ctx, src.Image, fmt.Sprintf("rdump / %q", dir)); err != nil {
		return fmt.Errorf("extracting %s: %w", source, err)
	}
	return nil
}
