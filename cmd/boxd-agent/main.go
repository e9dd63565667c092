//go:build linux

// Command boxd-agent is boxd's in-guest agent: the /init of a box's initramfs (see package agent). Run under the
// name box (/usr/local/bin/box in every box links to it) it is the box command, which asks boxd on the host for
// forks of the box and more (box --help). Run as anything else but PID 1 it serves connections for manual testing:
//
//	boxd-agent serve --socket PATH   # a unix socket; each connection is one SSH connection to the agent
//	boxd-agent serve --port NAME     # a virtio-serial port, in a guest with an init of its own
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/boxd-dev/boxd/agent"
)

const usage = "usage: boxd-agent serve (--socket PATH | --port NAME) [--system]  (as PID 1 it boots the box)"

func main() {
	if os.Getpid() == 1 {
		agent.Init() // never returns
	}
	switch filepath.Base(os.Args[0]) {
	case "box":
		os.Exit(boxMain(os.Args[1:], os.Stdout, os.Stderr))
	case agent.EnterName:
		os.Exit(agent.Enter(os.Args[1:], os.Stderr))
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "boxd-agent:", err)
		os.Exit(2)
	}
}

func run(args []string) error {
	if len(args) == 0 || args[0] != "serve" {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := fs.String("socket", "", "serve SSH connections on this unix socket")
	port := fs.String("port", "", "serve the virtio-serial port of this name (e.g. "+agent.DefaultPortName+")")
	system := fs.Bool("system", false, "apply unique requests (RNG, clock, hostname, machine-id) to this machine")
	if err := fs.Parse(args[1:]); err != nil || fs.NArg() != 0 || (*socket == "") == (*port == "") {
		return errors.New(usage)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	keepIgnoring(syscall.SIGHUP) // SIGINT is handled above; Go handles the rest itself
	key, err := agent.NewHostKey()
	if err != nil {
		return err
	}
	cfg := &agent.ServerConfig{
		HostKey: key,
		Logf:    func(format string, a ...any) { fmt.Fprintf(os.Stderr, "boxd-agent: "+format+"\n", a...) },
	}
	if *system {
		cfg.System = agent.OS{}
	}
	if *port != "" {
		path, err := agent.FindPort(ctx, *port, 0)
		if err != nil {
			return err
		}
		err = agent.ServeSerial(ctx, agent.NextPortConn(path, nil), cfg)
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	return serveSocket(ctx, *socket, cfg)
}

// keepIgnoring has the agent go on ignoring those of sigs it was started with ignored (nohup ignores SIGHUP)
// without passing that on to the sessions and processes it starts: an ignored signal stays ignored across exec, a
// handled one goes back to its default.
func keepIgnoring(sigs ...os.Signal) {
	for _, sig := range sigs {
		if signal.Ignored(sig) {
			signal.Notify(make(chan os.Signal, 1), sig)
		}
	}
}

// serveSocket serves each connection to a unix socket (root's alone) at path, at the same time.
func serveSocket(ctx context.Context, path string, cfg *agent.ServerConfig) error {
	_ = os.Remove(path)
	old := syscall.Umask(0o077)
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "unix", path)
	syscall.Umask(old)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	context.AfterFunc(ctx, func() { l.Close() })
	cfg.Logf("listening on %s", path)
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			if err := agent.Serve(ctx, conn, cfg); err != nil {
				cfg.Logf("%v", err)
			}
		}()
	}
}
