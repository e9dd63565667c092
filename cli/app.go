// Package cli holds boxd's command-line interface.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/containerd/errdefs"
	"github.com/urfave/cli/v2"
)

// DefaultRoot is where boxd keeps its state unless told otherwise.
const DefaultRoot = "/var/lib/boxd"

// usageError marks a mistake in how a command was called.
func usageError(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalidArgument)...)
}

var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print machine-readable JSON on stdout"}

// NewApp returns the boxd command.
func NewApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:  "boxd",
		Usage: "persistent Linux micro-VMs that fork, hibernate and share one deduplicated store",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Value: DefaultRoot, EnvVars: []string{"BOXD_ROOT"}, Usage: "folder holding boxd's store and metadata"},
			jsonFlag,
		},
		Commands:        append([]*cli.Command{daemonCommand()}, append(boxCommands(), eventsCommand(), keysCommand(), storeCommand(), imageCommand(), snapshotterCommand(), vmmCommand())...),
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		// A repeated flag's values may hold commas (--env K=a,b).
		DisableSliceFlagSeparator: true,
		ExitErrHandler:            func(*cli.Context, error) {},
		OnUsageError:              onUsageError,
	}
	var setUsage func([]*cli.Command)
	setUsage = func(cmds []*cli.Command) {
		for _, cmd := range cmds {
			cmd.OnUsageError = onUsageError
			setUsage(cmd.Subcommands)
		}
	}
	setUsage(app.Commands)
	return app
}

// onUsageError makes a flag the command does not know a usage error (exit
// 2, one line on stderr) instead of a help page on stdout.
func onUsageError(_ *cli.Context, err error, _ bool) error {
	return usageError("%v", err)
}

// Main runs boxd with args and returns the process's exit code.
func Main(ctx context.Context, args []string) int {
	app := NewApp(os.Stdout, os.Stderr)
	if err := app.RunContext(ctx, flagsFirst(app, args)); err != nil {
		// boxd exec exits with the status of the command it ran.
		if st := commandExit(0); errors.As(err, &st) {
			return int(st)
		}
		// The only exit coder the framework returns is for an unknown
		// command: a usage error.
		if ec := cli.ExitCoder(nil); errors.As(err, &ec) {
			err = usageError("%v", err)
		}
		fmt.Fprintf(os.Stderr, "boxd: %v\n", err)
		return errcat.ExitCode(err)
	}
	return 0
}
