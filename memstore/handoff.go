package memstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/boxd-dev/boxd/internal/uffd"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

// RegionLayout describes one registered region to a handler in another
// process, with the field names of Firecracker's page-fault handler
// protocol: the region's address in the owner's address space, its size,
// where it starts in the snapshot's memory map (bytes), and its page size.
type RegionLayout struct {
	Base     uint64 `json:"base_host_virt_addr"`
	Size     uint64 `json:"size"`
	Offset   uint64 `json:"offset"`
	PageSize uint64 `json:"page_size"`
}

// Handoff is what the owner of guest memory sends with its userfaultfd:
// which snapshot and map to serve, and the regions.
type Handoff struct {
	Snapshot string         `json:"snapshot"`
	Map      string         `json:"map"`
	Regions  []RegionLayout `json:"regions"`
}

// maxHandoff bounds the JSON a handler accepts.
const maxHandoff = 1 << 16

// Register creates a userfaultfd in this process and registers region with
// it, for handing to a handler in another process with SendHandoff. The
// caller keeps the descriptor open: if it were closed in both processes,
// faulting threads would see zero pages.
func Register(region []byte) (*uffd.FD, error) {
	if len(region) == 0 || len(region)%PageSize != 0 || uffd.Addr(region)%PageSize != 0 {
		return nil, fmt.Errorf("region must be page-aligned and a non-empty whole number of pages: %w", errdefs.ErrInvalidArgument)
	}
	fd, err := uffd.New()
	if err != nil {
		return nil, err
	}
	if err := fd.Register(uffd.Addr(region), uintptr(len(region))); err != nil {
		fd.Close()
		return nil, err
	}
	return fd, nil
}

// LayoutOf describes region, mapped at offset bytes into the memory map.
func LayoutOf(region []byte, offset uint64) RegionLayout {
	return RegionLayout{Base: uint64(uffd.Addr(region)), Size: uint64(len(region)), Offset: offset, PageSize: PageSize}
}

// SendHandoff sends h as JSON with fd attached (SCM_RIGHTS) in one message.
func SendHandoff(conn *net.UnixConn, fd *uffd.FD, h Handoff) error {
	msg, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if len(msg) > maxHandoff {
		return fmt.Errorf("handoff of %d bytes is too large: %w", len(msg), errdefs.ErrInvalidArgument)
	}
	oob := unix.UnixRights(fd.Fd())
	n, oobn, err := conn.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("sending userfaultfd: %w", err)
	}
	if n != len(msg) || oobn != len(oob) {
		return errors.New("sending userfaultfd: short write")
	}
	return nil
}

// ReceiveHandoff reads one handoff and its userfaultfd from conn.
func ReceiveHandoff(conn *net.UnixConn) (*uffd.FD, Handoff, error) {
	var h Handoff
	buf := make([]byte, maxHandoff)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, h, fmt.Errorf("receiving userfaultfd: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, h, fmt.Errorf("receiving userfaultfd: no descriptor attached: %w", errdefs.ErrInvalidArgument)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return nil, h, fmt.Errorf("receiving userfaultfd: want one descriptor: %w", errdefs.ErrInvalidArgument)
	}
	f := os.NewFile(uintptr(fds[0]), "userfaultfd")
	defer f.Close()
	if err := json.Unmarshal(buf[:n], &h); err != nil {
		return nil, h, fmt.Errorf("handoff: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	for i, r := range h.Regions {
		if r.PageSize != PageSize || r.Size == 0 || r.Size%PageSize != 0 || r.Base%PageSize != 0 || r.Offset%PageSize != 0 {
			return nil, h, fmt.Errorf("handoff region %d: want page-aligned %d-byte pages: %w", i, PageSize, errdefs.ErrInvalidArgument)
		}
	}
	fd, err := uffd.FromFile(f)
	if err != nil {
		return nil, h, err
	}
	return fd, h, nil
}

// Serve serves the regions of a handoff from the graph, in this process.
// With a connection, it runs until ctx ends or serving fails, then shuts the
// server down and returns it (for its stats and working set). With conn nil
// it returns the running server at once; the caller watches Failed and
// calls Shutdown. A failure is
// reported on the connection as one JSON line {"error": "..."} so that the
// owner can stop its guest; the owner's faulting threads stay blocked, never
// served a wrong page.
func Serve(ctx context.Context, g *snapshotter.Graph, fd *uffd.FD, h Handoff, conn *net.UnixConn, opts Options) (*Server, error) {
	if h.Map == "" {
		h.Map = DefaultMap
	}
	r, err := g.OpenMap(h.Snapshot, h.Map)
	if err != nil {
		return nil, err
	}
	if opts.Prefetch == nil {
		if ws, _, err := g.WorkingSet(h.Snapshot, h.Map); err == nil {
			opts.Prefetch = ws
		}
	}
	spans := make([]span, len(h.Regions))
	for i, reg := range h.Regions {
		spans[i] = span{base: uintptr(reg.Base), pages: int(reg.Size / PageSize), first: reg.Offset / PageSize}
	}
	s, err := newServer(ctx, fd, spans, g, h.Snapshot, h.Map, r, opts, nil)
	if err != nil {
		return nil, err
	}
	if conn == nil {
		return s, nil
	}
	select {
	case <-s.Failed():
		err = s.Err()
		if conn != nil {
			line, _ := json.Marshal(map[string]string{"error": err.Error()})
			_, _ = conn.Write(append(line, '\n'))
		}
	case <-ctx.Done():
	}
	s.Shutdown()
	return s, err
}

// HandlerError waits for the handler's report on conn: the error it sent
// (when serving failed), or nil when it closed the connection.
func HandlerError(conn *net.UnixConn) error {
	dec := json.NewDecoder(conn)
	var msg struct {
		Error string `json:"error"`
	}
	if err := dec.Decode(&msg); err != nil {
		return nil
	}
	return fmt.Errorf("page-fault handler: %s: %w", msg.Error, errdefs.ErrDataLoss)
}

// FailRegion makes region inaccessible and wakes the threads waiting on its
// faults, so that they fail (SIGSEGV in the process, EFAULT from KVM_RUN)
// instead of waiting for a handler that has given up.
func FailRegion(fd *uffd.FD, region []byte) error {
	if err := unix.Mprotect(region, unix.PROT_NONE); err != nil {
		return fmt.Errorf("mprotect: %w", err)
	}
	return fd.Wake(uffd.Addr(region), uintptr(len(region)))
}
