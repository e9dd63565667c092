package cli

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/agent"
	"github.com/boxd-dev/boxd/backends"
	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/boxd-dev/boxd/guest"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/boxd-dev/boxd/sshproxy"
	"github.com/urfave/cli/v2"
	"golang.org/x/crypto/ssh"
	"golang.org/x/term"
)

// maxForks bounds boxd fork --count as a sanity check on the number; what
// the host can hold is the box manager's to judge (admission control).
const maxForks = 4096

// boxCommands are the commands that work on boxes through the daemon.
func boxCommands() []*cli.Command {
	nameOnly := func(name, usage, doing string, op lifecycleOp) *cli.Command {
		return &cli.Command{
			Name: name, Usage: usage, ArgsUsage: "NAME", Flags: []cli.Flag{jsonFlag},
			Action: func(c *cli.Context) error { return boxLifecycle(c, doing, op) },
		}
	}
	return []*cli.Command{
		{
			Name:      "create",
			Usage:     "make a box from an image, or from a box's snapshot, and boot it (through the daemon)",
			ArgsUsage: "NAME",
			Description: "NAME is 1 to 63 lowercase letters, digits and '-'. The box admits the keys of --ssh-key; without it,\n" +
				"~/.ssh/id_ed25519.pub if there is one, else a key boxd makes once at ROOT/ssh/id_ed25519.\n" +
				"With --from, the box carries on from a snapshot a box took (boxd snapshots lists them), processes and\n" +
				"all, like a fork: with its own hostname and machine-id, fresh entropy and the host's clock, and the\n" +
				"snapshot's image, memory and vCPUs.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "image", Value: guest.DefaultImage, Usage: "the image to make the box from (see boxd image ls); left out, the default image, which the daemon builds first if the store lacks it"},
				&cli.StringFlag{Name: "from", Usage: "a box's snapshot to make the box from, e.g. box.dev.s1 (instead of --image)"},
				&cli.StringFlag{Name: "memory", Value: "512M", Usage: "the box's memory, in bytes or with K, M, G"},
				&cli.IntFlag{Name: "cpus", Value: box.DefaultCPUs, Usage: "the box's vCPUs"},
				&cli.StringFlag{Name: "runner", Value: box.RunnerAuto, Usage: "the runner: auto or qemu (QEMU), or kvm (boxd's own VMM: refused where it cannot boot Linux boxes)"},
				&cli.StringSliceFlag{Name: "ssh-key", Usage: "a file of public keys (authorized_keys format, a .pub file) to admit; may be repeated"},
				&cli.BoolFlag{Name: "allow-fork-from-inside", Value: true, Usage: "let the box command inside the box fork it and act on its forks (box fork, box exec, ...); forks inherit it"},
				&cli.IntFlag{Name: "max-forks", Value: box.DefaultMaxForks, Usage: "the live forks (forks of forks counted) the box command inside may make"},
				&cli.StringSliceFlag{Name: "expose-host-port", Usage: "a TCP port on the host's loopback the box may reach at its gateway, 10.0.2.2 (a box reaches no host address otherwise; forks do not inherit it); may be repeated"},
				jsonFlag,
			},
			Action: boxCreate,
		},
		{Name: "ls", Usage: "list the boxes", Flags: []cli.Flag{jsonFlag}, Action: boxList},
		{
			Name:      "fork",
			Usage:     "clone a running or hibernated box, memory, disk and processes, into new boxes",
			ArgsUsage: "SRC NEW",
			Flags: []cli.Flag{
				&cli.IntFlag{Name: "count", Value: 1, Usage: fmt.Sprintf("make NEW-1 .. NEW-N instead of NEW (1 to %d; refused when this host's memory cannot hold them)", maxForks)},
				jsonFlag,
			},
			Action: boxFork,
		},
		nameOnly("hibernate", "save a running box into the store and free its memory", "hibernating", (*daemon.Client).Hibernate),
		nameOnly("resume", "bring a hibernated box back, processes and all", "resuming", (*daemon.Client).Resume),
		nameOnly("start", "boot a stopped box (or resume a hibernated one)", "starting", (*daemon.Client).Start),
		nameOnly("stop", "shut a box's machine down, keeping its disk", "stopping", (*daemon.Client).Stop),
		nameOnly("pause", "stop a running box's vCPUs, keeping its memory where it is", "pausing", (*daemon.Client).Pause),
		nameOnly("unpause", "let a paused box run on", "unpausing", (*daemon.Client).Unpause),
		{
			Name:      "snapshot",
			Usage:     "save a running box as a snapshot box.NAME.SNAP; the box goes on",
			ArgsUsage: "NAME",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "name", Usage: "SNAP, the snapshot's name after box.NAME. ([A-Za-z0-9._-]; default: chosen)"},
				jsonFlag,
			},
			Action: boxSnapshot,
		},
		{Name: "snapshots", Usage: "a box's snapshots (or every box's) as a tree", ArgsUsage: "[NAME]", Flags: []cli.Flag{jsonFlag}, Action: boxSnapshots},
		{
			Name:      "exec",
			Usage:     "run a command in a box, its input and output streamed; boxd exits with its exit status",
			ArgsUsage: "NAME [-i] [-t] -- CMD [ARGS...]",
			Description: "The command's output is shown as it writes it. boxd's standard input is passed to the command with -i,\n" +
				"or when it is not a terminal (a pipe, a file), unless --no-stdin is given; otherwise the command's input\n" +
				"is empty. -t runs the command on a pseudo-terminal the size of boxd's terminal (its stdout and stderr\n" +
				"both arrive on stdout); with -i as well, boxd's terminal is put in raw mode while the command runs, so\n" +
				"that keys such as ^C reach the command, and window size changes follow. With --json the output is\n" +
				"collected and printed as one object when the command exits.",
			UseShortOptionHandling: true,
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "interactive", Aliases: []string{"i"}, Usage: "pass boxd's standard input to the command, even from a terminal"},
				&cli.BoolFlag{Name: "tty", Aliases: []string{"t"}, Usage: "run the command on a pseudo-terminal"},
				&cli.BoolFlag{Name: "no-stdin", Aliases: []string{"n"}, Usage: "give the command empty input instead of boxd's"},
				jsonFlag,
			},
			Action: boxExec,
		},
		{
			Name:        "ssh",
			Usage:       "log in to a box with OpenSSH's ssh through the daemon's SSH front door",
			ArgsUsage:   "NAME [-- SSH ARGS...]",
			Description: "Runs ssh -p PORT [-i ROOT/ssh/id_ed25519] -o UserKnownHostsFile=ROOT/ssh/known_hosts\n-o StrictHostKeyChecking=accept-new NAME@127.0.0.1 [SSH ARGS...].",
			Action:      boxSSH,
		},
		logsCommand(),
		runCommand(),
		{Name: "rm", Usage: "stop a box and delete it (snapshots other boxes came from stay)", ArgsUsage: "NAME", Flags: []cli.Flag{jsonFlag}, Action: boxRemove},
		{Name: "report", Usage: "the store's dedup report of each box's snapshots (all boxes, or those named)", ArgsUsage: "[NAME...]", Flags: []cli.Flag{jsonFlag}, Action: boxReport},
		statsCommand(),
	}
}

// boxArgs checks the number of positional arguments.
func boxArgs(c *cli.Context, lo, hi int, usage string) error {
	if n := c.NArg(); n < lo || (hi >= 0 && n > hi) {
		return usageError("usage: boxd %s %s (got %d arguments)", c.Command.Name, usage, n)
	}
	return nil
}

// daemonClient returns a client of the daemon of the root; it acts for the
// registered key that daemon.OwnerEnv names, if any (the front door's
// commands for user boxd).
func daemonClient(c *cli.Context) (*daemon.Client, string, error) {
	root, err := rootDir(c)
	if err != nil {
		return nil, "", err
	}
	d := daemon.NewClient(root)
	if owner := os.Getenv(daemon.OwnerEnv); owner != "" {
		d = d.ForOwner(owner)
	}
	return d, root, nil
}

// say writes a line of progress on stderr when it is a terminal and JSON
// was not asked for.
func say(c *cli.Context, format string, args ...any) {
	f, ok := c.App.ErrWriter.(*os.File)
	if wantJSON(c) || !ok || !term.IsTerminal(int(f.Fd())) {
		return
	}
	fmt.Fprintf(f, format+"\n", args...)
}

// lifecycleOp is a client's method that changes a box's state.
type lifecycleOp = func(d *daemon.Client, ctx context.Context, name string) (box.Box, error)

func boxLifecycle(c *cli.Context, doing string, op lifecycleOp) error {
	if err := boxArgs(c, 1, 1, "NAME"); err != nil {
		return err
	}
	name := c.Args().First()
	if err := box.ValidateName(name); err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	say(c, "%s box %s…", doing, name)
	start := time.Now()
	bx, err := op(d, c.Context, name)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, bx)
	}
	fmt.Fprintf(c.App.Writer, "box %s is %s (%s)\n", bx.Name, bx.State, time.Since(start).Round(10*time.Millisecond))
	return nil
}

// readKeyFile returns the public keys of an authorized_keys file, one line
// each.
func readKeyFile(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ssh key file: %w", err)
	}
	keys, err := sshproxy.ParseAuthorizedKeys(data)
	if err != nil {
		return nil, fmt.Errorf("ssh key file %s: %w", path, err)
	}
	var lines []string
	for _, k := range keys {
		lines = append(lines, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(k))))
	}
	return lines, nil
}

// boxdKeyPath is the key boxd makes for boxes when the user has none.
func boxdKeyPath(root string) string { return filepath.Join(root, "ssh", "id_ed25519") }

// boxdKey returns the public key of the key boxd keeps at
// ROOT/ssh/id_ed25519, making it (mode 0600, with its .pub beside it) the
// first time.
func boxdKey(root string) (string, error) {
	path := boxdKeyPath(root)
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		data, err = makeKey(path)
	}
	if err != nil {
		return "", fmt.Errorf("boxd's ssh key: %w", err)
	}
	signer, err := ssh.ParsePrivateKey(data)
	if err != nil {
		return "", fmt.Errorf("boxd's ssh key %s: %w", path, err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))), nil
}

// makeKey writes a new ed25519 key in OpenSSH's format at path, atomically
// (a key already there, made concurrently, wins), and returns the key file.
func makeKey(path string) ([]byte, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "boxd")
	if err != nil {
		return nil, err
	}
	data := pem.EncodeToMemory(block)
	f, err := os.CreateTemp(filepath.Dir(path), ".id_ed25519-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	if err := os.Link(f.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return os.ReadFile(path)
		}
		return nil, err
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub))) + " boxd\n"
	if err := os.WriteFile(path+".pub", []byte(line), 0o644); err != nil {
		return nil, err
	}
	return data, nil
}

func boxCreate(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "NAME [--image IMAGE | --from SNAPSHOT] [--memory 512M] [--cpus 1] [--runner auto] [--ssh-key FILE]..."); err != nil {
		return err
	}
	name := c.Args().First()
	if err := box.ValidateName(name); err != nil {
		return err
	}
	if _, err := box.ChooseRunner(backends.Offline(), backends.Default, c.String("runner")); err != nil {
		return fmt.Errorf("--runner: %w", err)
	}
	from := c.String("from")
	if c.IsSet("from") {
		for _, f := range []string{"image", "memory", "cpus"} {
			if c.IsSet(f) {
				return usageError("--from %s and --%s together: a box made from a snapshot has the snapshot's image, memory and vCPUs", from, f)
			}
		}
		if err := snapshotter.ValidateName(from); err != nil {
			return fmt.Errorf("--from: %w", err)
		}
	}
	mem, err := parseSize(c.String("memory"))
	if err != nil {
		return fmt.Errorf("--memory: %w", err)
	}
	if mem < 128<<20 || mem%(1<<20) != 0 {
		return usageError("--memory %s: want a whole number of MiB, at least 128M", c.String("memory"))
	}
	if cpus := c.Int("cpus"); cpus < 1 || cpus > 64 {
		return usageError("--cpus %d: want 1 to 64", cpus)
	}
	if n := c.Int("max-forks"); n < 1 || n > box.MaxMaxForks {
		return usageError("--max-forks %d: want 1 to %d", n, box.MaxMaxForks)
	}
	var hostPorts []uint16
	for _, v := range c.StringSlice("expose-host-port") {
		for p := range strings.SplitSeq(v, ",") {
			n, err := strconv.ParseUint(strings.TrimSpace(p), 10, 16)
			if err != nil || n == 0 {
				return usageError("--expose-host-port %s: want a TCP port, 1 to 65535", p)
			}
			hostPorts = append(hostPorts, uint16(n))
		}
	}
	// A box made for a registered key admits that key; the daemon sets it.
	owned := os.Getenv(daemon.OwnerEnv) != ""
	if owned && c.IsSet("ssh-key") {
		return usageError("--ssh-key: a box made over SSH admits the key that made it")
	}
	var keys []string
	for _, path := range c.StringSlice("ssh-key") {
		k, err := readKeyFile(path)
		if err != nil {
			return err
		}
		keys = append(keys, k...)
	}
	d, root, err := daemonClient(c)
	if err != nil {
		return err
	}
	// Ask the daemon first, so that a command without one makes no key.
	if _, err := d.Info(c.Context); err != nil {
		return err
	}
	// A registered key's create (over SSH) builds no image: building is
	// the host's operator's to decide.
	if from == "" && !c.IsSet("image") && !owned {
		if err := firstUse(c, d); err != nil {
			return err
		}
	}
	if len(keys) == 0 && !owned {
		if home, err := os.UserHomeDir(); err == nil {
			own := filepath.Join(home, ".ssh", "id_ed25519.pub")
			if _, err := os.Stat(own); err == nil {
				if keys, err = readKeyFile(own); err != nil {
					return err
				}
			}
		}
	}
	if len(keys) == 0 && !owned {
		k, err := boxdKey(root)
		if err != nil {
			return err
		}
		keys = []string{k}
	}
	req := daemon.CreateRequest{
		Name: name, Image: c.String("image"), Memory: mem, CPUs: c.Int("cpus"), Keys: keys, Runner: c.String("runner"),
		NoInside: !c.Bool("allow-fork-from-inside"), MaxForks: c.Int("max-forks"), HostPorts: hostPorts,
	}
	if from != "" {
		req.Image, req.Memory, req.CPUs, req.From = "", 0, 0, from
		say(c, "starting box %s from snapshot %s…", name, from)
	} else {
		say(c, "booting box %s…", name)
	}
	start := time.Now()
	bx, err := d.Create(c.Context, req)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, bx)
	}
	what := "image " + bx.Image
	if from != "" {
		what = "from " + from
	}
	fmt.Fprintf(c.App.Writer, "box %s is %s (%s, %s, %d vCPU) in %s; log in with: %s\n",
		bx.Name, bx.State, what, size2(bx.Memory), bx.CPUs, time.Since(start).Round(100*time.Millisecond), loginHint(bx.Name))
	return nil
}

// loginHint is how to log in to box name: boxd ssh on the host, ssh
// through the front door the person reached for the front door's
// commands.
func loginHint(name string) string {
	host, port, err := net.SplitHostPort(os.Getenv(daemon.FrontDoorEnv))
	if err != nil {
		return "boxd ssh " + name
	}
	return fmt.Sprintf("ssh -p %s %s@%s", port, name, host)
}

func boxList(c *cli.Context) error {
	if err := boxArgs(c, 0, 0, ""); err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	boxes, err := d.List(c.Context)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		if boxes == nil {
			boxes = []box.Box{}
		}
		return printJSON(c, boxes)
	}
	labelled := slices.ContainsFunc(boxes, func(b box.Box) bool { return len(b.Labels) > 0 })
	rows := [][]string{{"NAME", "STATE", "RUNNER", "IMAGE", "MEMORY", "CPUS", "FORKED FROM", "CREATED"}}
	if labelled {
		rows[0] = append(rows[0], "LABELS")
	}
	for _, b := range boxes {
		parent := b.Parent
		if parent == "" {
			parent = "-"
		}
		image := b.Image
		if image == "" {
			image = b.BaseSnapshot // a root file system that is not an image
		}
		row := []string{b.Name, b.State, b.Runner, image, size2(b.Memory), strconv.Itoa(b.CPUs), parent, b.Created.Local().Format(time.DateTime)}
		if labelled {
			row = append(row, labelList(b.Labels))
		}
		rows = append(rows, row)
	}
	table(c.App.Writer, rows)
	return nil
}

// labelList is labels as KEY=VALUE,... in the order of their keys ("-" for
// none).
func labelList(labels map[string]string) string {
	if len(labels) == 0 {
		return "-"
	}
	var out []string
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		out = append(out, k+"="+labels[k])
	}
	return strings.Join(out, ",")
}

// forkNames returns the names of the boxes boxd fork makes: NEW, or NEW-1
// .. NEW-count when count was given.
func forkNames(newName string, count int, counted bool) ([]string, error) {
	if count < 1 || count > maxForks {
		return nil, usageError("--count %d: want 1 to %d", count, maxForks)
	}
	if !counted {
		return []string{newName}, box.ValidateName(newName)
	}
	names := make([]string, count)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%d", newName, i+1)
		if err := box.ValidateName(names[i]); err != nil {
			return nil, err
		}
	}
	return names, nil
}

func boxFork(c *cli.Context) error {
	if err := boxArgs(c, 2, 2, "SRC NEW [--count N]"); err != nil {
		return err
	}
	src := c.Args().Get(0)
	if err := box.ValidateName(src); err != nil {
		return err
	}
	names, err := forkNames(c.Args().Get(1), c.Int("count"), c.IsSet("count"))
	if err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	say(c, "forking box %s into %s…", src, strings.Join(names, ", "))
	start := time.Now()
	boxes, err := d.Fork(c.Context, src, names)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, boxes)
	}
	var made []string
	for _, b := range boxes {
		made = append(made, b.Name)
	}
	fmt.Fprintf(c.App.Writer, "forked %s into %s in %s\n", src, strings.Join(made, ", "), time.Since(start).Round(10*time.Millisecond))
	return nil
}

func boxSnapshot(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "NAME [--name SNAP]"); err != nil {
		return err
	}
	name := c.Args().First()
	if err := box.ValidateName(name); err != nil {
		return err
	}
	snap := c.String("name")
	if c.IsSet("name") {
		if err := snapshotter.ValidateName(snap); err != nil {
			return fmt.Errorf("--name: %w", err)
		}
		if err := snapshotter.ValidateName("box." + name + "." + snap); err != nil {
			return fmt.Errorf("--name: %w", err)
		}
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	say(c, "snapshotting box %s…", name)
	sn, err := d.Snapshot(c.Context, name, snap)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, sn)
	}
	parent := sn.Parent
	if parent == "" {
		parent = "none"
	}
	fmt.Fprintf(c.App.Writer, "snapshot %s of box %s (parent %s)\n", sn.Name, name, parent)
	return nil
}

func boxSnapshots(c *cli.Context) error {
	if err := boxArgs(c, 0, 1, "[NAME]"); err != nil {
		return err
	}
	var trees []daemon.BoxSnapshots
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	if c.NArg() == 1 {
		name := c.Args().First()
		if err := box.ValidateName(name); err != nil {
			return err
		}
		nodes, err := d.Snapshots(c.Context, name)
		if err != nil {
			return err
		}
		if wantJSON(c) {
			if nodes == nil {
				nodes = []*daemon.SnapshotNode{}
			}
			return printJSON(c, nodes)
		}
		trees = []daemon.BoxSnapshots{{Box: name, Snapshots: nodes}}
	} else {
		if trees, err = d.AllSnapshots(c.Context); err != nil {
			return err
		}
		if wantJSON(c) {
			if trees == nil {
				trees = []daemon.BoxSnapshots{}
			}
			return printJSON(c, trees)
		}
	}
	w := c.App.Writer
	for _, t := range trees {
		fmt.Fprintf(w, "box %s\n", t.Box)
		if len(t.Snapshots) == 0 {
			fmt.Fprintln(w, "  (no snapshots)")
			continue
		}
		var rows [][]string
		var walk func(n *daemon.SnapshotNode, depth int, root bool)
		walk = func(n *daemon.SnapshotNode, depth int, root bool) {
			note := ""
			if root && n.Parent != "" {
				note = "from " + n.Parent
			}
			if n.Current {
				note = strings.TrimSpace(note + " (current)")
			}
			rows = append(rows, []string{strings.Repeat("  ", depth+1) + n.Name, size2(n.Size), n.Created.Local().Format(time.DateTime), note})
			for _, ch := range n.Children {
				walk(ch, depth+1, false)
			}
		}
		for _, n := range t.Snapshots {
			walk(n, 0, true)
		}
		table(w, rows)
	}
	return nil
}

// commandExit is the exit status of a command run in a box, which boxd
// exits with.
type commandExit int

func (e commandExit) Error() string { return fmt.Sprintf("the command exited with status %d", int(e)) }

// splitDashes splits the arguments of a command NAME [--] REST...: the
// flag parser keeps a "--" that follows a positional argument.
func splitDashes(args []string) (string, []string) {
	if len(args) == 0 {
		return "", nil
	}
	rest := args[1:]
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	}
	return args[0], rest
}

func boxExec(c *cli.Context) error {
	name, cmd := splitDashes(c.Args().Slice())
	if name == "" || len(cmd) == 0 {
		return usageError("usage: boxd exec NAME [-i] [-t] -- CMD [ARGS...]")
	}
	if err := box.ValidateName(name); err != nil {
		return err
	}
	if c.Bool("interactive") && c.Bool("no-stdin") {
		return usageError("-i passes standard input and --no-stdin withholds it: give one")
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	stdinFD := int(os.Stdin.Fd())
	stdinTerm := term.IsTerminal(stdinFD)
	opts := daemon.ExecOptions{Args: cmd, TTY: c.Bool("tty"), Stdout: c.App.Writer, Stderr: c.App.ErrWriter}
	if !c.Bool("no-stdin") && (c.Bool("interactive") || !stdinTerm) {
		opts.Stdin = os.Stdin
	}
	var stdout, stderr *capped
	if wantJSON(c) {
		stdout, stderr = &capped{max: daemon.MaxExecOutput}, &capped{max: daemon.MaxExecOutput}
		opts.Stdout, opts.Stderr = stdout, stderr
	}
	if opts.TTY {
		restore, err := localTerminal(&opts, stdinTerm && opts.Stdin != nil)
		if err != nil {
			return err
		}
		defer restore()
	}
	code, err := d.ExecStream(c.Context, name, opts)
	if err != nil {
		// ^C (without a pty, which would have passed it on) ends the
		// command with boxd, as a shell reports it.
		if errors.Is(err, context.Canceled) && c.Err() != nil {
			return commandExit(130)
		}
		return err
	}
	if wantJSON(c) {
		res := daemon.ExecResult{ExitCode: code, Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Truncated: stdout.truncated || stderr.truncated}
		if err := printJSON(c, res); err != nil {
			return err
		}
	}
	switch {
	case code == 0:
		return nil
	case code < 0 || code > 255:
		return commandExit(255)
	}
	return commandExit(code)
}

// localTerminal sizes opts's pty after boxd's terminal, if it has one, and
// makes the pty follow its window size changes; with raw, it puts the
// terminal on standard input in raw mode. The returned function undoes it.
func localTerminal(opts *daemon.ExecOptions, raw bool) (func(), error) {
	fd := -1
	for _, f := range []*os.File{os.Stdin, os.Stdout, os.Stderr} {
		if term.IsTerminal(int(f.Fd())) {
			fd = int(f.Fd())
			break
		}
	}
	if fd < 0 {
		return func() {}, nil // the agent's default size
	}
	if cols, rows, err := term.GetSize(fd); err == nil {
		opts.Rows, opts.Cols = rows, cols
	}
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	resize := make(chan agent.WindowSize, 1)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-winch:
				cols, rows, err := term.GetSize(fd)
				if err != nil {
					continue
				}
				select { // the latest size wins
				case <-resize:
				default:
				}
				resize <- agent.WindowSize{Rows: rows, Cols: cols}
			}
		}
	}()
	opts.Resize = resize
	undo := func() {
		signal.Stop(winch)
		close(done)
	}
	if !raw {
		return undo, nil
	}
	state, err := term.MakeRaw(int(os.Stdin.Fd()))
	if err != nil {
		undo()
		return nil, fmt.Errorf("putting the terminal in raw mode: %w", err)
	}
	return func() {
		_ = term.Restore(int(os.Stdin.Fd()), state)
		undo()
	}, nil
}

// capped keeps the first max bytes written to it and drops the rest.
type capped struct {
	bytes.Buffer
	max       int
	truncated bool
}

func (b *capped) Write(p []byte) (int, error) {
	n := len(p)
	if room := b.max - b.Len(); len(p) > room {
		p, b.truncated = p[:max(room, 0)], true
	}
	b.Buffer.Write(p)
	return n, nil
}

func boxSSH(c *cli.Context) error {
	name, extra := splitDashes(c.Args().Slice())
	if name == "" {
		return usageError("usage: boxd ssh NAME [-- SSH ARGS...]")
	}
	if err := box.ValidateName(name); err != nil {
		return err
	}
	sshPath, err := exec.LookPath("ssh")
	if err != nil {
		return fmt.Errorf("boxd ssh runs OpenSSH's ssh, which is not installed (Debian package openssh-client): %w", fs.ErrNotExist)
	}
	d, root, err := daemonClient(c)
	if err != nil {
		return err
	}
	info, err := d.Info(c.Context)
	if err != nil {
		return err
	}
	if _, err := d.Get(c.Context, name); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(info.SSHAddr)
	if err != nil {
		return fmt.Errorf("the daemon's SSH address %q: %w", info.SSHAddr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	sshDir := filepath.Join(root, "ssh")
	if err := os.MkdirAll(sshDir, 0o700); err != nil {
		return err
	}
	argv := []string{"ssh", "-p", port}
	if _, err := os.Stat(boxdKeyPath(root)); err == nil {
		argv = append(argv, "-i", boxdKeyPath(root))
	}
	argv = append(argv,
		"-o", "UserKnownHostsFile="+filepath.Join(sshDir, "known_hosts"),
		"-o", "StrictHostKeyChecking=accept-new",
		name+"@"+host)
	argv = append(argv, extra...)
	// ssh takes over the terminal and the process: its exit status is
	// boxd's.
	return syscall.Exec(sshPath, argv, os.Environ())
}

func boxRemove(c *cli.Context) error {
	if err := boxArgs(c, 1, 1, "NAME"); err != nil {
		return err
	}
	name := c.Args().First()
	if err := box.ValidateName(name); err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	if err := d.Remove(c.Context, name); err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, map[string]string{"removed": name})
	}
	fmt.Fprintf(c.App.Writer, "removed box %s\n", name)
	return nil
}

func boxReport(c *cli.Context) error {
	for _, n := range c.Args().Slice() {
		if err := box.ValidateName(n); err != nil {
			return err
		}
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	rep, err := d.Report(c.Context, c.Args().Slice()...)
	if err != nil {
		return err
	}
	if wantJSON(c) {
		return printJSON(c, rep)
	}
	rows := [][]string{{"BOX", "SNAPSHOTS", "LOGICAL", "REFERENCED", "UNIQUE", "STORED", "DEDUP", "EXCLUSIVE"}}
	row := func(name string, r snapshotter.Report) []string {
		var excl int64
		for _, s := range r.PerSnap {
			excl += s.ExclusiveBytes
		}
		return []string{name, strconv.Itoa(r.Snapshots), size(r.LogicalBytes), size(r.ReferencedBytes), size(r.UniqueBytes), size(r.StoredBytes), ratioStr(r.DedupRatio), size(excl)}
	}
	for _, b := range rep.Boxes {
		rows = append(rows, row(b.Box, b.Report))
	}
	rows = append(rows, row("(together)", rep.Total))
	table(c.App.Writer, rows)
	fmt.Fprintln(c.App.Writer, "\nEXCLUSIVE: what removing the box's snapshots, then gc, would free; `boxd store report` has the whole store")
	return nil
}

// passthrough names the commands whose arguments after their first n
// positional ones (NAME, or none for run) belong to another program (the
// command to run, ssh's arguments): flags are looked for only before them.
var passthrough = map[string]int{"exec": 1, "ssh": 1, "run": 0}

// flagsFirst lets the flags of the daemon and box commands follow their
// positional arguments, as their usage shows them (boxd create dev --memory
// 1G): it moves such flags before the positional arguments, where the flag
// parser looks for them. "--" ends the flags.
func flagsFirst(app *cli.App, args []string) []string {
	isBool := func(flags []cli.Flag, name string) bool {
		if name == "help" || name == "h" {
			return true
		}
		for _, f := range flags {
			for _, n := range f.Names() {
				if n == name {
					_, ok := f.(*cli.BoolFlag)
					return ok
				}
			}
		}
		return false
	}
	// takesValue reports whether flag token t is followed by its value.
	takesValue := func(flags []cli.Flag, t string) bool {
		if strings.Contains(t, "=") {
			return false
		}
		name := strings.TrimLeft(t, "-")
		if !strings.HasPrefix(t, "--") && len(name) > 1 && !isBool(flags, name) {
			// Short flags together (-it): a value follows only if the
			// last one takes it.
			return !isBool(flags, name[len(name)-1:])
		}
		return !isBool(flags, name)
	}
	i := 1
	for i < len(args) && strings.HasPrefix(args[i], "-") && args[i] != "-" && args[i] != "--" {
		if takesValue(app.Flags, args[i]) {
			i++
		}
		i++
	}
	if i >= len(args) {
		return args
	}
	cmd := app.Command(args[i])
	if cmd == nil || !reorders[cmd.Name] {
		return args
	}
	var flags, pos []string
	skip, isPassthrough := passthrough[cmd.Name]
	rest := args[i+1:]
	for j := 0; j < len(rest); j++ {
		t := rest[j]
		switch {
		case t == "--" || (isPassthrough && len(pos) >= skip && !strings.HasPrefix(t, "-")):
			pos = append(pos, rest[j:]...)
			j = len(rest)
		case strings.HasPrefix(t, "-") && t != "-":
			flags = append(flags, t)
			if takesValue(cmd.Flags, t) && j+1 < len(rest) {
				j++
				flags = append(flags, rest[j])
			}
		default:
			pos = append(pos, t)
		}
	}
	out := append([]string{}, args[:i+1]...)
	return append(append(out, flags...), pos...)
}

// reorders names the commands flagsFirst applies to.
var reorders = func() map[string]bool {
	m := map[string]bool{"daemon": true}
	for _, c := range boxCommands() {
		m[c.Name] = true
	}
	return m
}()
