package memstore

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"testing"

	"github.com/boxd-dev/boxd/cas"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// TestMain doubles as the page-fault handler process of TestHandoff: with
// BOXD_TEST_HANDLER set it connects to that socket, receives a userfaultfd
// and serves it from the store under BOXD_TEST_ROOT until the owner hangs up.
func TestMain(m *testing.M) {
	if sock := os.Getenv("BOXD_TEST_HANDLER"); sock != "" {
		os.Exit(runHandler(sock, os.Getenv("BOXD_TEST_ROOT")))
	}
	os.Exit(m.Run())
}

func runHandler(sock, root string) int {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return 2
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	fd, h, err := ReceiveHandoff(conn)
	if err != nil {
		return 3
	}
	defer fd.Close()
	g, err := openGraphForHandler(root)
	if err != nil {
		return 4
	}
	defer g.Close()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		// The owner hanging up ends serving.
		var b [1]byte
		conn.Read(b[:])
		cancel()
	}()
	if _, err := Serve(ctx, g, fd, h, conn, Options{FaultAround: 8}); err != nil {
		return 5
	}
	return 0
}

// startHandler runs this test binary as a handler process and returns the
// owner's end of the connection.
func startHandler(t *testing.T, root string) (*net.UnixConn, *exec.Cmd) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "pfh.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BOXD_TEST_HANDLER="+sock, "BOXD_TEST_ROOT="+root)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.UnixConn), cmd
}

func TestHandoff(t *testing.T) {
	const pages = 1024
	src := image(10, pages)
	root := t.TempDir()
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	g.Close() // one process holds a root at a time: the handler's now

	region := anon(t, len(src))
	fd, err := Register(region)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	conn, cmd := startHandler(t, root)
	if err := SendHandoff(conn, fd, Handoff{Snapshot: "m", Regions: []RegionLayout{LayoutOf(region, 0)}}); err != nil {
		t.Fatal(err)
	}
	touch(region, allPages(pages), 2)
	if !bytes.Equal(region, src) {
		t.Fatal("memory served by the handler process differs from the image")
	}
	conn.CloseWrite()
	if err := HandlerError(conn); err != nil {
		t.Fatalf("handler reported %v", err)
	}
	conn.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("handler process: %v", err)
	}
}

func TestHandoffDamaged(t *testing.T) {
	const pages = 64
	src := image(11, pages)
	root := t.TempDir()
	g := testutil.OpenGraph(t, root, snapshotter.Open)
	capture(t, g, src, CaptureOptions{Name: "m"})
	loc, err := g.Store().Lookup(cas.Sum(src[5*PageSize : 6*PageSize]))
	if err != nil {
		t.Fatal(err)
	}
	g.Close()
	packs, _ := filepath.Glob(filepath.Join(root, "cas", "packs", "*.pack"))
	f, err := os.OpenFile(packs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xff, 0xfe, 0xfd}, int64(loc.Offset)+100)
	f.Close()

	region := anon(t, len(src))
	fd, err := Register(region)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	conn, cmd := startHandler(t, root)
	defer cmd.Wait()
	defer conn.Close()
	if err := SendHandoff(conn, fd, Handoff{Snapshot: "m", Regions: []RegionLayout{LayoutOf(region, 0)}}); err != nil {
		t.Fatal(err)
	}
	faulted := make(chan any, 1)
	go func() {
		debug.SetPanicOnFault(true)
		defer func() { faulted <- recover() }()
		sink.Add(int64(region[5*PageSize+1]))
	}()
	herr := HandlerError(conn)
	if !errors.Is(herr, errdefs.ErrDataLoss) {
		t.Fatalf("handler report %v, want a corruption error", herr)
	}
	if err := FailRegion(fd, region); err != nil {
		t.Fatal(err)
	}
	if got := <-faulted; got == nil {
		t.Error("the damaged page was read without a fault")
	}
}

func TestReceiveHandoffRejects(t *testing.T) {
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	// No descriptor attached.
	if _, err := a.Write([]byte(`{"snapshot":"m"}`)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ReceiveHandoff(b); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("handoff without a descriptor: %v, want ErrInvalidArgument", err)
	}
}

func socketPair() (*net.UnixConn, *net.UnixConn, error) {
	dir, err := os.MkdirTemp("", "boxd-sp")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(dir)
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		return nil, nil, err
	}
	defer l.Close()
	a, err := net.Dial("unix", filepath.Join(dir, "s"))
	if err != nil {
		return nil, nil, err
	}
	b, err := l.Accept()
	if err != nil {
		return nil, nil, err
	}
	return a.(*net.UnixConn), b.(*net.UnixConn), nil
}
