package cli

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/boxd-dev/boxd/daemon"
	"github.com/containerd/errdefs"
	"github.com/urfave/cli/v2"
)

// remoteCommands are boxd store's commands on the bucket a daemon
// started with --remote shares with other hosts.
func remoteCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:      "push",
			Usage:     "put a hibernated box (or a snapshot) and what it stands on into the daemon's --remote bucket",
			ArgsUsage: "NAME",
			Flags:     []cli.Flag{jsonFlag},
			Action:    func(c *cli.Context) error { return storeTransfer(c, "push") },
		},
		{
			Name:      "pull",
			Usage:     "bring a box (or a snapshot) from the daemon's --remote bucket into this root, without resuming it",
			ArgsUsage: "NAME",
			Flags:     []cli.Flag{jsonFlag},
			Action:    func(c *cli.Context) error { return storeTransfer(c, "pull") },
		},
		{
			Name:      "break-lease",
			Usage:     "take box NAME from HOST, a host known to be gone (fenced): another host may then resume its last push",
			ArgsUsage: "NAME HOST",
			Action:    storeBreakLease,
		},
	}
}

func storeBreakLease(c *cli.Context) error {
	if err := args(c, 2, "NAME HOST"); err != nil {
		return err
	}
	dc, err := remoteDaemon(c)
	if err != nil {
		return err
	}
	if err := dc.BreakLease(c.Context, c.Args().Get(0), c.Args().Get(1)); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "box %s is no longer owned by %s\n", c.Args().Get(0), c.Args().Get(1))
	return nil
}

// remoteDaemon is the daemon of --root, which must run.
func remoteDaemon(c *cli.Context) (*daemon.Client, error) {
	dc := runningDaemon(c)
	if dc == nil {
		return nil, fmt.Errorf("boxd store %s works through the daemon, started with --remote s3://BUCKET/PREFIX, and none serves this root: %w", c.Command.Name, errdefs.ErrUnavailable)
	}
	return dc, nil
}

func storeTransfer(c *cli.Context, op string) error {
	if err := args(c, 1, "NAME"); err != nil {
		return err
	}
	dc, err := remoteDaemon(c)
	if err != nil {
		return err
	}
	res, err := dc.StoreTransfer(c.Context, op, c.Args().First())
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, res)
	}
	what := "snapshot " + res.Snapshot
	if res.Box != "" {
		what = "box " + res.Box + " (snapshot " + res.Snapshot + ")"
	}
	switch {
	case res.Push != nil:
		fmt.Fprintf(c.App.Writer, "pushed %s: %d snapshots, %d packs, %s in %v\n", what, res.Push.Snapshots, res.Push.Packs, size(res.Push.PackBytes), res.Push.Took.Round(1e6))
	case res.Pull != nil:
		fmt.Fprintf(c.App.Writer, "pulled %s: %d snapshots, %d chunks, %s in %d requests in %v\n", what, res.Pull.Snapshots, res.Pull.Chunks, size(res.Pull.FetchedBytes), res.Pull.Requests, res.Pull.Took.Round(1e6))
	default:
		fmt.Fprintf(c.App.Writer, "%sed %s\n", op, what)
	}
	return nil
}

// remoteReport prints what the daemon's bucket holds beside the local
// store, when a daemon with --remote serves the root; it reports whether
// it did.
func remoteReport(c *cli.Context) (bool, error) {
	dc := runningDaemon(c)
	if dc == nil {
		return false, nil
	}
	rep, err := dc.RemoteReport(c.Context)
	if errdefs.IsNotFound(err) {
		return false, nil // a daemon without --remote
	}
	if err != nil {
		return true, err
	}
	if wantJSON(c) {
		return true, printJSON(c, rep)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "host %s, remote %s\n", rep.Host, rep.URL)
	table(w, [][]string{
		{"  local packs", strconv.Itoa(rep.LocalPacks), size(rep.LocalBytes), fmt.Sprintf("(%d uploaded)", rep.Uploaded)},
		{"  remote packs", strconv.Itoa(rep.Packs), size(rep.PackBytes), fmt.Sprintf("(%d index segments)", rep.Segments)},
		{"  remote snapshots", strconv.Itoa(rep.Snapshots), "", ""},
		{"  remote boxes", strconv.Itoa(len(rep.Boxes)), strings.Join(rep.Boxes, " "), ""},
	})
	for _, l := range rep.Leases {
		fmt.Fprintf(w, "  lease: box %s owned by %s since %s\n", l.Box, l.Host, l.Taken.Format("2006-01-02 15:04:05"))
	}
	if len(rep.PendingPush) > 0 {
		fmt.Fprintf(w, "  pushes to try again: %s\n", strings.Join(rep.PendingPush, " "))
	}
	return true, nil
}
