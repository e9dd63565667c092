// Command boxd is boxd's one binary: `boxd daemon` serves a root's boxes
// (the API on its unix socket and the SSH front door), the box commands
// (create, exec, fork, hibernate, ...) drive them through that daemon, and
// `boxd store`, `boxd image` and `boxd snapshotter` work on the root's store.
// The command line itself is package cli.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/boxd-dev/boxd/cli"
	"github.com/boxd-dev/boxd/errcat"
)

func main() { os.Exit(run()) }

func run() int {
	// BOXD_CPUPROFILE=FILE writes a CPU profile of the run, for bench/.
	if path := os.Getenv("BOXD_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "boxd: cpu profile: %v\n", err)
			return errcat.ExitFailure
		}
		if err := pprof.StartCPUProfile(f); err == nil {
			defer pprof.StopCPUProfile()
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return cli.Main(ctx, os.Args)
}
