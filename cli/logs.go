package cli

import (
	"context"
	"errors"
	"io"
	"os"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

func logsCommand() *cli.Command {
	return &cli.Command{
		Name:      "logs",
		Usage:     "show a box's console: the kernel's and boxd-agent's messages; -f follows it",
		ArgsUsage: "NAME [-f] [--tail N]",
		Description: "Prints what box NAME wrote to its serial console across its boots, hibernations and resumes: the\n" +
			"kernel's messages and boxd-agent's (a box that has not run yet has written nothing). With -f, boxd goes on\n" +
			"printing what the box writes until ^C, the box is removed, or the daemon stops. The console is printed as\n" +
			"the box wrote it, so there is no --json; on a terminal, though, boxd leaves out the control sequences that\n" +
			"would change the terminal (the firmware resets the screen at each boot), keeping colours.\n" +
			"Boxes boot with the kernel's \"quiet\": only kernel messages of level err (3) or more urgent reach the\n" +
			"console. Inside a box, `echo '<3>text' > /dev/kmsg` shows on it and a line written to /dev/kmsg without\n" +
			"a level does not; a line written to /dev/console always does.",
		UseShortOptionHandling: true,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "follow", Aliases: []string{"f"}, Usage: "go on printing what the box writes to its console"},
			&cli.IntFlag{Name: "tail", Aliases: []string{"n"}, Usage: "print only the last `N` lines (0: none)", DefaultText: "all"},
		},
		Action: boxLogs,
	}
}

func boxLogs(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "NAME [-f] [--tail N]"); err != nil {
		return err
	}
	if wantJSON(c) {
		return usageError("boxd logs prints the console as the box wrote it; it has no --json")
	}
	name := c.Args().First()
	if err := box.ValidateName(name); err != nil {
		return err
	}
	opts := daemon.LogsOptions{Tail: -1, Follow: c.Bool("follow")}
	if c.IsSet("tail") {
		if opts.Tail = c.Int("tail"); opts.Tail < 0 {
			return usageError("--tail %d: want a number of lines, 0 or more", opts.Tail)
		}
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	out := c.App.Writer
	if f, ok := out.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		out = &termFilter{w: out}
	}
	err = d.Logs(c.Context, name, opts, out)
	// ^C ends a follow, as a shell reports it.
	if errors.Is(err, context.Canceled) && c.Err() != nil {
		return commandExit(130)
	}
	return err
}

// termFilter passes a console on to a terminal without the control
// characters and escape sequences that would change the terminal (reset
// it, clear it, turn off line wrapping, set its title); colours (SGR
// sequences) and tabs, newlines and carriage returns stay. A sequence
// may be split across writes.
type termFilter struct {
	w     io.Writer
	state termState
	seq   []byte // the CSI sequence read so far
}

// termState is where termFilter is in an escape sequence.
type termState int

const (
	inText   termState = iota
	inEsc              // after ESC
	inEscIn            // in an ESC sequence's intermediate bytes
	inCSI              // in a control sequence: ESC [
	inOSC              // in an operating system command: ESC ], up to BEL or ESC \
	inOSCEsc           // after ESC in an OSC
)

// maxCSI bounds a kept control sequence; a longer one is dropped.
const maxCSI = 64

func (f *termFilter) Write(p []byte) (int, error) {
	out := make([]byte, 0, len(p))
	for _, b := range p {
		switch f.state {
		case inText:
			switch {
			case b == 0x1b:
				f.state = inEsc
			case b == '\t' || b == '\n' || b == '\r' || (b >= 0x20 && b != 0x7f):
				out = append(out, b)
			}
		case inEsc:
			switch {
			case b == '[':
				f.state, f.seq = inCSI, append(f.seq[:0], 0x1b, '[')
			case b == ']':
				f.state = inOSC
			case b >= 0x20 && b <= 0x2f:
				f.state = inEscIn
			default:
				f.state = inText
			}
		case inEscIn:
			if b < 0x20 || b > 0x2f {
				f.state = inText
			}
		case inCSI:
			switch {
			case b >= 0x40 && b <= 0x7e:
				// Only SGR, which sets colours: ESC [ params m.
				if b == 'm' && len(f.seq) <= maxCSI && isSGRParams(f.seq[2:]) {
					out = append(append(out, f.seq...), b)
				}
				f.state = inText
			case b >= 0x20 && b <= 0x3f:
				if len(f.seq) <= maxCSI {
					f.seq = append(f.seq, b)
				}
			default:
				f.state = inText
			}
		case inOSC:
			switch b {
			case 0x07:
				f.state = inText
			case 0x1b:
				f.state = inOSCEsc
			}
		case inOSCEsc:
			if b == '\\' {
				f.state = inText
			} else {
				f.state = inOSC
			}
		}
	}
	if _, err := f.w.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// isSGRParams reports whether p are the parameters of a plain SGR
// sequence: digits and ';' or ':'.
func isSGRParams(p []byte) bool {
	for _, b := range p {
		if (b < '0' || b > '9') && b != ';' && b != ':' {
			return false
		}
	}
	return true
}
