package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

// statsInterval is how often boxd stats measures the boxes: the span each
// CPU share covers.
const statsInterval = time.Second

func statsCommand() *cli.Command {
	return &cli.Command{
		Name:      "stats",
		Usage:     "what boxes use of the host (CPU, memory, disk, store, uptime), refreshed every second",
		ArgsUsage: "[NAME...]",
		Description: "Without NAMEs: the boxes that have a machine (running or paused); with --all, every box.\n" +
			"CPU % is the share of one host CPU the box's machine used over the last second (two busy CPUs: 200%);\n" +
			"it takes two measurements a second apart, so the first figures come after a second, also with\n" +
			"--no-stream. PSS is the host memory the machine holds, memory it shares with other machines (the\n" +
			"snapshot that forks map) counted as its share; RSS counts that memory in full. DISK is what the box's\n" +
			"writable disk layer takes on the host's disk. STORE (with --store) is what the box's snapshots alone\n" +
			"hold in the store, compressed: what removing the box, then boxd store gc, would free; the daemon\n" +
			"measures it again only when snapshots have changed. UPTIME counts from the machine's start or resume.\n" +
			"On a terminal the table is redrawn in place, elsewhere printed anew each time; --json prints one JSON\n" +
			"array a line each time, or one array with --no-stream. ^C exits 130.",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "all", Aliases: []string{"a"}, Usage: "every box, also stopped and hibernated ones (without NAMEs)"},
			&cli.BoolFlag{Name: "store", Usage: "add what each box's snapshots alone hold in the store"},
			&cli.BoolFlag{Name: "no-stream", Usage: "print the figures once and exit"},
			jsonFlag,
		},
		Action: boxStats,
	}
}

// statsRow is one box's figures as boxd stats prints them: what the
// daemon measured, and what boxd works out from two measurements.
type statsRow struct {
	box.Usage
	// CPUPercent is the share of one host CPU the machine used since the
	// previous measurement, in per cent.
	CPUPercent *float64 `json:"cpu_percent,omitempty"`
	// UptimeSeconds is how long the machine has run, at At.
	UptimeSeconds *float64 `json:"uptime_seconds,omitempty"`
}

func boxStats(c *cli.Context) error {
	names := c.Args().Slice()
	for _, n := range names {
		if err := box.ValidateName(n); err != nil {
			return err
		}
	}
	if c.Bool("all") && len(names) > 0 {
		return usageError("--all and box names together: --all is every box")
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	ctx := c.Context
	opts := daemon.StatsOptions{Boxes: names, All: c.Bool("all")}
	stream := !c.Bool("no-stream")
	// The first measurement is only where CPU shares start from.
	// ^C ends the stream, as a shell reports it.
	interrupted := func(err error) error {
		if errors.Is(err, context.Canceled) && ctx.Err() != nil {
			return commandExit(130)
		}
		return err
	}
	prev, err := d.Stats(ctx, opts)
	if err != nil {
		return interrupted(err)
	}
	opts.Store = c.Bool("store")
	show := statsPrinter(c, stream)
	tick := time.NewTicker(statsInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return interrupted(ctx.Err())
		case <-tick.C:
		}
		cur, err := d.Stats(ctx, opts)
		if err != nil {
			return interrupted(err)
		}
		if err := show(statsRows(prev, cur)); err != nil {
			return err
		}
		if !stream {
			return nil
		}
		prev = cur
	}
}

// statsRows pairs each box's measurement with its previous one.
func statsRows(prev, cur []box.Usage) []statsRow {
	before := map[string]box.Usage{}
	for _, u := range prev {
		before[u.Name] = u
	}
	rows := make([]statsRow, 0, len(cur))
	for _, u := range cur {
		r := statsRow{Usage: u}
		if p, ok := before[u.Name]; ok {
			if pct, ok := cpuPercent(p, u); ok {
				r.CPUPercent = &pct
			}
		}
		if !u.Started.IsZero() {
			up := max(u.At.Sub(u.Started), 0).Seconds()
			r.UptimeSeconds = &up
		}
		rows = append(rows, r)
	}
	return rows
}

// cpuPercent is the share of one host CPU that a box's machine used
// between two measurements of it, in per cent. There is none when either
// lacks CPU time, or when the machine is not the same one in both (it
// started again between them).
func cpuPercent(prev, cur box.Usage) (float64, bool) {
	if prev.CPUSeconds == nil || cur.CPUSeconds == nil || !prev.Started.Equal(cur.Started) {
		return 0, false
	}
	span := cur.At.Sub(prev.At).Seconds()
	used := *cur.CPUSeconds - *prev.CPUSeconds
	if span <= 0 || used < 0 {
		return 0, false
	}
	return 100 * used / span, true
}

// statsPrinter returns what prints each measurement: JSON, a table redrawn
// in place on a terminal, or tables one after another.
func statsPrinter(c *cli.Context, stream bool) func([]statsRow) error {
	w := c.App.Writer
	switch {
	case wantJSON(c) && !stream:
		return func(rows []statsRow) error { return printJSON(c, rows) }
	case wantJSON(c):
		enc := json.NewEncoder(w)
		return func(rows []statsRow) error { return enc.Encode(rows) }
	}
	store := c.Bool("store")
	f, ok := w.(*os.File)
	redraw := stream && ok && term.IsTerminal(int(f.Fd()))
	first := true
	return func(rows []statsRow) error {
		switch {
		case redraw:
			fmt.Fprint(w, "\x1b[H\x1b[2J") // home, clear the screen
		case !first:
			fmt.Fprintln(w)
		}
		first = false
		statsTable(w, rows, store)
		return nil
	}
}

// statsTable writes rows as a table; "-" marks a figure there is none of.
func statsTable(w io.Writer, rows []statsRow, store bool) {
	head := []string{"NAME", "STATE", "CPU %", "PSS", "RSS", "DISK"}
	if store {
		head = append(head, "STORE")
	}
	lines := [][]string{append(head, "UPTIME")}
	for _, r := range rows {
		line := []string{r.Name, r.State, "-", "-", "-", "-"}
		if r.CPUPercent != nil {
			line[2] = strconv.FormatFloat(*r.CPUPercent, 'f', 2, 64) + "%"
		}
		if r.HostMemory != nil {
			line[3], line[4] = size(r.HostMemory.PSS), size(r.HostMemory.RSS)
		}
		if r.Disk != nil {
			line[5] = size(r.Disk.Allocated)
		}
		if store {
			s := "-"
			if r.Store != nil {
				s = size(r.Store.StoredBytes)
			}
			line = append(line, s)
		}
		up := "-"
		if r.UptimeSeconds != nil {
			up = uptime(time.Duration(*r.UptimeSeconds * float64(time.Second)))
		}
		lines = append(lines, append(line, up))
	}
	table(w, lines)
}

// uptime writes d in its two largest units: 42s, 5m07s, 3h02m, 2d04h.
func uptime(d time.Duration) string {
	s := int64(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	}
	return fmt.Sprintf("%dd%02dh", s/86400, s%86400/3600)
}
