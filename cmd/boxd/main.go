// Command boxd runs boxd: its store, and later its daemon and boxes.
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
