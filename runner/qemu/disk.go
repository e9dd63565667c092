package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// DiskMap is the name of a snapshot's disk map.
const DiskMap = "disk"

// qemuImg runs qemu-img and returns its output.
func qemuImg(ctx context.Context, args ...string) ([]byte, error) {
	path, err := exec.LookPath("qemu-img")
	if err != nil {
		return nil, errcat.NotSupported("qemu: qemu-img is missing (install the Debian package qemu-utils)")
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("qemu: qemu-img %s: %w: %s", args[0], err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// CreateOverlay makes path a new, empty qcow2 image over backing (a qcow2
// or raw image, which must not change while the overlay lives), named as
// given.
func CreateOverlay(_ context.Context, path, backing string) error {
	format, err := diskFormat(backing)
	if err != nil {
		return err
	}
	size, err := virtualSize(backing, format)
	if err != nil {
		return err
	}
	return createOverlayFile(path, backing, format, size)
}

// extent is one run of qemu-img map's answer.
type extent struct {
	Start  int64  `json:"start"`
	Length int64  `json:"length"`
	Depth  int    `json:"depth"`
	Zero   bool   `json:"zero"`
	Data   bool   `json:"data"`
	Offset *int64 `json:"offset"`
}

// overlayChanges lists what a qcow2 overlay holds itself (depth 0) and the
// image's virtual size.
func overlayChanges(ctx context.Context, file string) ([]extent, int64, error) {
	out, err := qemuImg(ctx, "map", "-U", "--output=json", "-f", "qcow2", file)
	if err != nil {
		return nil, 0, err
	}
	var all []extent
	if err := json.Unmarshal(out, &all); err != nil {
		return nil, 0, fmt.Errorf("qemu: qemu-img map of %s: %w", file, err)
	}
	var own []extent
	var size int64
	for _, e := range all {
		size = max(size, e.Start+e.Length)
		if e.Depth == 0 && (e.Data || e.Zero) {
			own = append(own, e)
		}
	}
	return own, size, nil
}

// writeOverlay writes the blocks a frozen qcow2 overlay holds into the
// disk map of img, over what img inherited from its parent.
func writeOverlay(ctx context.Context, img *snapshotter.Draft, file string) (blocks int64, err error) {
	changes, size, err := overlayChanges(ctx, file)
	if err != nil {
		return 0, err
	}
	f, err := os.Open(file)
	if err != nil {
		return 0, fmt.Errorf("qemu: disk overlay: %w", err)
	}
	defer f.Close()
	zero := make([]byte, cas.ChunkSize)
	buf := make([]byte, cas.ChunkSize)
	for _, e := range changes {
		if e.Start%cas.ChunkSize != 0 || e.Length%cas.ChunkSize != 0 {
			return blocks, fmt.Errorf("qemu: overlay %s: extent %d+%d is not in whole blocks: %w", file, e.Start, e.Length, errdefs.ErrInvalidArgument)
		}
		for off := int64(0); off < e.Length; off += cas.ChunkSize {
			if err := ctx.Err(); err != nil {
				return blocks, err
			}
			data := zero
			if e.Data {
				if e.Offset == nil {
					return blocks, errcat.NotSupported("qemu: overlay %s: extent at %d has no file offset (compressed?)", file, e.Start)
				}
				if _, err := f.ReadAt(buf, *e.Offset+off); err != nil {
					return blocks, fmt.Errorf("qemu: reading overlay %s: %w", file, err)
				}
				data = buf
			}
			if err := img.WriteBlock(DiskMap, snapshotter.KindDisk, uint64((e.Start+off)/cas.ChunkSize), data); err != nil {
				return blocks, err
			}
			blocks++
		}
	}
	return blocks, img.SetSize(DiskMap, snapshotter.KindDisk, size)
}
