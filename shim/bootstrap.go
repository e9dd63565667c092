package shim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	taskapi "github.com/containerd/containerd/api/runtime/task/v2"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/fifo"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The shim binary's command line, as containerd runs it:
//
//	containerd-shim-boxd-v2 -namespace NS -id ID -address ADDR [-publish-binary BIN] [-bundle DIR] [-debug] start|delete
//	containerd-shim-boxd-v2 -info
//
// start makes the serving shim (the same binary with no action, its
// socket on fd 3) and prints its address; delete removes what a shim that
// died left (the container's box) and prints a DeleteResponse. The
// working directory is the container's bundle.
type options struct {
	namespace, id, address, publishBinary, bundle string
	debug, info                                   bool
	action                                        string
}

// listenerFD is the serving shim's inherited socket.
const listenerFD = 3

// socketDir holds the serving shims' sockets, as containerd's own do.
const socketDir = "/run/containerd/s"

func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("containerd-shim-boxd-v2", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.namespace, "namespace", "", "containerd namespace")
	fs.StringVar(&o.id, "id", "", "container id")
	fs.StringVar(&o.address, "address", "", "containerd's grpc address")
	fs.StringVar(&o.publishBinary, "publish-binary", "", "containerd's binary to publish events with (unused: events go over ttrpc)")
	fs.StringVar(&o.bundle, "bundle", "", "the container's bundle (default: the working directory)")
	fs.BoolVar(&o.debug, "debug", false, "log at debug level")
	fs.BoolVar(&o.info, "info", false, "print the runtime's information (a protobuf RuntimeInfo)")
	if err := fs.Parse(args); err != nil {
		return o, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	o.action = fs.Arg(0)
	if o.bundle == "" {
		o.bundle, _ = os.Getwd()
	}
	return o, nil
}

// Main is the shim binary; newBoxes connects to the boxd daemon. It
// returns the process's exit code.
func Main(args []string, newBoxes func() (Boxes, error)) int {
	o, err := parseOptions(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if o.info {
		return printProto(&types.RuntimeInfo{Name: RuntimeName, Version: &types.RuntimeVersion{Version: "boxd"}})
	}
	if o.namespace == "" || o.id == "" {
		fmt.Fprintln(os.Stderr, "containerd-shim-boxd-v2: -namespace and -id are required")
		return 2
	}
	switch o.action {
	case "start":
		addr, err := start(o)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Print(addr)
		return 0
	case "delete":
		return cleanup(o, newBoxes)
	case "":
		if err := serve(o, newBoxes); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	fmt.Fprintf(os.Stderr, "containerd-shim-boxd-v2: unknown action %q\n", o.action)
	return 2
}

func printProto(m proto.Message) int {
	data, err := proto.Marshal(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if _, err := os.Stdout.Write(data); err != nil {
		return 1
	}
	return 0
}

// socketPath is the serving shim's socket of a container.
func socketPath(o options) string { return SocketPath(o.address, o.namespace, o.id) }

// SocketPath is the socket the serving shim of container id in namespace
// ns listens on, for the containerd whose address is address.
func SocketPath(address, ns, id string) string {
	sum := sha256.Sum256([]byte(address + "\x00" + ns + "\x00" + id))
	return filepath.Join(socketDir, "boxd-"+hex.EncodeToString(sum[:16]))
}

// start listens on the container's socket, starts the serving shim on it
// in a session of its own (it outlives containerd) and returns the
// address containerd dials.
func start(o options) (string, error) {
	if addr, ok, err := podShim(o); ok || err != nil {
		if err == nil {
			_ = os.WriteFile(filepath.Join(o.bundle, "address"), []byte(addr), 0o644)
		}
		return addr, err
	}
	path := socketPath(o)
	if err := os.MkdirAll(socketDir, 0o711); err != nil {
		return "", fmt.Errorf("shim socket folder: %w", err)
	}
	if conn, err := net.Dial("unix", path); err == nil {
		_ = conn.Close()
		return "", fmt.Errorf("a shim already serves container %s on %s: %w", o.id, path, errdefs.ErrAlreadyExists)
	}
	_ = os.Remove(path) // a dead shim's
	l, err := net.Listen("unix", path)
	if err != nil {
		return "", fmt.Errorf("shim socket: %w", err)
	}
	// The serving shim listens on it: closing this copy must not unlink it.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	defer l.Close()
	f, err := l.(*net.UnixListener).File()
	if err != nil {
		return "", err
	}
	defer f.Close()
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	args := []string{"-namespace", o.namespace, "-id", o.id, "-address", o.address, "-bundle", o.bundle}
	if o.debug {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = o.bundle
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		_ = os.Remove(path)
		return "", fmt.Errorf("starting the serving shim: %w", err)
	}
	_ = cmd.Process.Release()
	addr := "unix://" + path
	_ = os.WriteFile(filepath.Join(o.bundle, "address"), []byte(addr), 0o644)
	return addr, nil
}

// logger writes the shim's log to the bundle's log fifo, which containerd
// reads into its own log, else to standard error.
func logger(o options) (*slog.Logger, func()) {
	var w io.Writer = os.Stderr
	closer := func() {}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if f, err := fifo.OpenFifo(ctx, filepath.Join(o.bundle, "log"), syscall.O_WRONLY, 0o700); err == nil {
		w, closer = f, func() { _ = f.Close() }
	}
	level := slog.LevelInfo
	if o.debug {
		level = slog.LevelDebug
	}
	h := slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})
	return slog.New(h).With("runtime", RuntimeName, "namespace", o.namespace, "id", o.id), closer
}

// serve serves the task service on the inherited socket until containerd
// lets it go (Shutdown), or a signal stops it.
func serve(o options, newBoxes func() (Boxes, error)) error {
	log, closeLog := logger(o)
	defer closeLog()
	boxes, err := newBoxes()
	if err != nil {
		log.Error("connecting to boxd", "err", err)
		return err
	}
	l, err := net.FileListener(os.NewFile(listenerFD, "shim socket"))
	if err != nil {
		return fmt.Errorf("the shim socket (fd %d): %w", listenerFD, err)
	}
	events := NewForwarder(os.Getenv("TTRPC_ADDRESS"), o.namespace, log)
	done := make(chan struct{})
	var exitOnce sync.Once
	svc := NewRouter(Config{Namespace: o.namespace, ID: o.id, Boxes: boxes, Events: events, Log: log,
		Exit: func() { exitOnce.Do(func() { close(done) }) }})
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(categorised))
	if err != nil {
		return err
	}
	taskapi.RegisterTTRPCTaskService(srv, svc)
	go func() {
		if err := srv.Serve(context.Background(), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
			log.Error("serving", "err", err)
		}
	}()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	signal.Ignore(syscall.SIGPIPE)
	select {
	case <-done:
	case sig := <-sigs:
		log.Info("stopping", "signal", sig.String())
	}
	// Answer the Shutdown call before going; containerd keeps its
	// connection open, so do not wait for it to be idle.
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_ = srv.Shutdown(ctx)
	_ = srv.Close()
	svc.Close()
	events.Close()
	_ = os.Remove(l.Addr().String())
	return nil
}

// categorised turns the service's errors into the status codes containerd
// reads back as errdefs categories.
func categorised(ctx context.Context, unmarshal ttrpc.Unmarshaler, _ *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
	resp, err := method(ctx, unmarshal)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return resp, nil
}

// cleanup is the delete action: containerd runs it once the serving shim
// is gone, to remove what it left. The container's box goes (its name is
// in the bundle); its exit is reported as a SIGKILL.
func cleanup(o options, newBoxes func() (Boxes, error)) int {
	name, member, label := BoxName(o.namespace, o.id), false, ""
	if data, err := os.ReadFile(filepath.Join(o.bundle, BoxFile)); err == nil {
		lines := strings.Fields(string(data))
		name, member = "", len(lines) > 1 && lines[1] == podMember
		if len(lines) > 0 {
			name = lines[0]
		}
		if member && len(lines) > 2 {
			label = lines[2]
		}
	} else if errors.Is(err, os.ErrNotExist) {
		name = "" // deleted by the serving shim, or never made
	}
	if name != "" {
		boxes, err := newBoxes()
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			if member {
				err = leavePod(ctx, boxes, name, o.id, label) // the pod's box is its sandbox's to remove
			} else {
				err = boxes.Remove(ctx, name)
			}
			cancel()
		}
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			fmt.Fprintf(os.Stderr, "removing box %s of container %s: %v\n", name, o.id, err)
			return 1
		}
		_ = os.Remove(filepath.Join(o.bundle, BoxFile))
	}
	_ = os.Remove(socketPath(o))
	return printProto(&taskapi.DeleteResponse{ExitStatus: 128 + sigKILL, ExitedAt: timestamppb.Now()})
}
