package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/events"
	"github.com/urfave/cli/v2"
)

func eventsCommand() *cli.Command {
	return &cli.Command{
		Name:  "events",
		Usage: "stream what happens to boxes and the store (created, forked, hibernated, resumed, stopped, removed, snapshot, gc), as it happens",
		Description: "Each event is printed once, in order, until interrupted or the daemon stops. With --since, the\n" +
			"events the daemon kept (its last " + fmt.Sprint(events.DefaultKeep) + " since it started) from that time come first.\n" +
			"With --json, each event is one JSON object on a line.",
		ArgsUsage: " ",
		Flags: []cli.Flag{
			jsonFlag,
			&cli.StringFlag{Name: "since", Usage: "show kept events from this time first: RFC 3339 (2026-12-06T10:00:00Z) or a duration ago (10m, 2h)"},
			&cli.StringSliceFlag{Name: "box", Usage: "only the events of this box (may be repeated)"},
		},
		Action: boxEvents,
	}
}

// parseSince reads --since: an RFC 3339 time, or a duration before now.
func parseSince(v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, usageError("--since %q: want an RFC 3339 time (2026-12-06T10:00:00Z) or a duration ago (10m)", v)
}

func boxEvents(c *cli.Context) error {
	if err := boxArgs(c, 0, 0, "events [--since T] [--box NAME]"); err != nil {
		return err
	}
	since, err := parseSince(c.String("since"), time.Now())
	if err != nil {
		return err
	}
	only := map[string]bool{}
	for _, b := range c.StringSlice("box") {
		only[b] = true
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	asJSON := wantJSON(c)
	enc := json.NewEncoder(c.App.Writer)
	err = d.Events(c.Context, since, func(e events.Event) error {
		if len(only) > 0 && !only[e.Box] {
			return nil
		}
		if asJSON {
			return enc.Encode(e)
		}
		_, err := fmt.Fprintln(c.App.Writer, eventText(e))
		return err
	})
	// ^C ends the stream, as a shell reports it.
	if errors.Is(err, context.Canceled) && c.Err() != nil {
		return commandExit(130)
	}
	return err
}

// eventText is an event as one line for people.
func eventText(e events.Event) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %-10s", e.Time.Local().Format("2006-01-02 15:04:05.000"), e.Type)
	if e.Box != "" {
		fmt.Fprintf(&b, "  %s", e.Box)
	}
	var more []string
	switch e.Type {
	case events.Forked:
		more = append(more, "from "+e.From)
	case events.Promoted:
		more = append(more, "from fork "+e.From, "state before in "+e.Snapshot)
	case events.Created:
		if e.From != "" {
			more = append(more, "from snapshot "+e.From)
		}
	case events.Snapshot, events.Hibernated:
		more = append(more, e.Snapshot)
	case events.GC:
		more = append(more, size(e.Bytes)+" freed")
	}
	if e.Reason != "" {
		more = append(more, e.Reason)
	}
	if e.Took > 0 {
		more = append(more, "took "+e.Took.Round(time.Millisecond).String())
	}
	if len(more) > 0 {
		fmt.Fprintf(&b, "  (%s)", strings.Join(more, ", "))
	}
	return b.String()
}
