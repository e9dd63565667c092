package cli

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/urfave/cli/v2"
)

// keysCommand manages the keys that may run boxd's box commands over SSH.
func keysCommand() *cli.Command {
	return &cli.Command{
		Name:  "keys",
		Usage: "the keys that may run boxd's box commands over SSH (ssh -p PORT boxd@host COMMAND)",
		Description: "A registered key runs ls, create, fork, hibernate, resume, rm, snapshots and report through the daemon's\n" +
			"SSH front door as user boxd, on the boxes it made there alone; a box it makes admits it (ssh NAME@host).",
		Subcommands: []*cli.Command{
			{
				Name: "add", Usage: "register the public keys of FILE (authorized_keys format, a .pub file)", ArgsUsage: "FILE",
				Flags: []cli.Flag{jsonFlag}, Action: keysAdd,
			},
			{Name: "ls", Usage: "list the registered keys", Flags: []cli.Flag{jsonFlag}, Action: keysList},
			{
				Name: "rm", Usage: "unregister a key; the boxes it made stay (boxd ls shows them on the host)", ArgsUsage: "FINGERPRINT",
				Flags: []cli.Flag{jsonFlag}, Action: keysRemove,
			},
		},
	}
}

// readKeyLines returns the key lines of an authorized_keys file, comments
// kept, once every line is checked.
func readKeyLines(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ssh key file: %w", err)
	}
	if _, err := sshproxy.ParseAuthorizedKeys(data); err != nil {
		return nil, fmt.Errorf("ssh key file %s: %w", path, err)
	}
	var lines []string
	for _, l := range bytes.Split(data, []byte("\n")) {
		if l = bytes.TrimSpace(l); len(l) > 0 && l[0] != '#' {
			lines = append(lines, string(l))
		}
	}
	return lines, nil
}

func keysAdd(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "FILE"); err != nil {
		return err
	}
	lines, err := readKeyLines(c.Args().First())
	if err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	added, err := d.AddKeys(c.Context, lines)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, added)
	}
	for _, k := range added {
		fmt.Fprintf(c.App.Writer, "registered key %s%s\n", k.Fingerprint, keyComment(k))
	}
	return nil
}

func keyComment(k daemon.RegisteredKey) string {
	if k.Comment == "" {
		return ""
	}
	return " (" + k.Comment + ")"
}

func keysList(c *cli.Context) error {
	if err := boxArgs(c, 0, 0, ""); err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	keys, err := d.Keys(c.Context)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		if keys == nil {
			keys = []daemon.RegisteredKey{}
		}
		return printJSON(c, keys)
	}
	rows := [][]string{{"FINGERPRINT", "TYPE", "BOXES", "COMMENT"}}
	for _, k := range keys {
		rows = append(rows, []string{k.Fingerprint, k.Type, strconv.Itoa(k.Boxes), k.Comment})
	}
	table(c.App.Writer, rows)
	return nil
}

func keysRemove(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "FINGERPRINT"); err != nil {
		return err
	}
	fp := c.Args().First()
	if strings.TrimPrefix(fp, "SHA256:") == "" {
		return usageError("give a key's fingerprint, SHA256:... (boxd keys ls lists them)")
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	k, err := d.RemoveKey(c.Context, fp)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, k)
	}
	fmt.Fprintf(c.App.Writer, "unregistered key %s%s\n", k.Fingerprint, keyComment(k))
	return nil
}
