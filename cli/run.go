package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/daemon"
	"github.com/containerd/errdefs"
	"github.com/urfave/cli/v2"
)

// Exit statuses of boxd run that are not the command's.
const (
	exitTimeout = 124 // --timeout ran out, as timeout(1) exits
	exitSignal  = 128 // plus the signal's number: boxd run was interrupted
)

// indexMark is replaced by a fork's index (1 to N) in the command, --env
// values and --copy-out paths.
const indexMark = "{i}"

// removeTimeout bounds the removal of a run's forks, which happens after
// the run's own context ended.
const removeTimeout = 5 * time.Minute

func runCommand() *cli.Command {
	return &cli.Command{
		Name:      "run",
		Usage:     "run a command in throwaway forks of a box, copy files out, remove the forks; exit with the command's status",
		ArgsUsage: "--fork-of WARM [flags] -- CMD [ARGS...]",
		Description: "Forks WARM (running or hibernated) into --count boxes named P-1 .. P-N (P is --name-prefix, default\n" +
			"WARM-run-XXXX), runs CMD in each at once with its output streamed (each line prefixed by its fork when N > 1,\n" +
			"or into DIR/I.log with --logs DIR), copies each --copy-out BOXPATH:HOSTPATH to the host when the command\n" +
			"ends, whatever its status (a file to the file HOSTPATH, a folder's contents into the folder HOSTPATH;\n" +
			"symbolic links and special files are skipped), and removes the forks unless --keep or, for the failed\n" +
			"ones, --keep-on-failure. {i} in CMD, in --env values and in --copy-out is replaced by the fork's index;\n" +
			"with N > 1 each --copy-out HOSTPATH must hold {i}.\n" +
			"Exit status: the command's (with N > 1: 0 if every fork succeeded, else the first failed fork's status,\n" +
			"or 1); 1 when a copy-out failed; 124 when --timeout ran out; 128+n on signal n (130 for SIGINT, 143 for\n" +
			"SIGTERM), which stops the commands and removes the forks (unless --keep); boxd's own error codes when it\n" +
			"could not run at all. An interruption while the forks are being made waits for them, then removes them.\n" +
			"With --promote (N = 1), a fork whose command succeeded becomes WARM, running; WARM's state before it is kept\n" +
			"as a snapshot, box.WARM.K-promoted if it ran (boxd snapshots WARM lists it; boxd create --from brings it back).\n" +
			"With --json the output goes to stderr and stdout gets one object: each fork's index, name, exit status,\n" +
			"seconds, log and copied paths.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "fork-of", Usage: "the box to fork (running or hibernated)"},
			&cli.IntFlag{Name: "count", Value: 1, Usage: fmt.Sprintf("the number of forks, each running CMD (1 to %d)", maxForks)},
			&cli.StringFlag{Name: "name-prefix", Usage: "the forks are named P-1 .. P-N (default WARM-run-XXXX, XXXX random)"},
			&cli.BoolFlag{Name: "keep", Usage: "keep every fork after the run"},
			&cli.BoolFlag{Name: "keep-on-failure", Usage: "keep the forks whose command (or copy-out) failed or timed out"},
			&cli.StringSliceFlag{Name: "copy-out", Usage: "BOXPATH:HOSTPATH, a file or folder to copy out of each fork when its command ends; may be repeated"},
			&cli.DurationFlag{Name: "timeout", Usage: "stop the commands and remove the forks after this long (e.g. 10m); boxd exits 124"},
			&cli.StringSliceFlag{Name: "env", Usage: "K=V, an environment variable for the command; may be repeated"},
			&cli.StringFlag{Name: "logs", Usage: "write each fork's output to DIR/I.log instead of the terminal"},
			&cli.BoolFlag{Name: "promote", Usage: "when the command succeeds, make the fork the new WARM (needs --count 1)"},
			jsonFlag,
		},
		Action: boxRun,
	}
}

// copySpec is one --copy-out, before {i} is replaced.
type copySpec struct{ box, host string }

// runOptions are boxd run's checked arguments.
type runOptions struct {
	warm    string
	names   []string // the forks, index i+1 at i
	cmd     []string
	env     map[string]string
	copies  []copySpec
	logs    string
	timeout time.Duration
	keep    bool
	keepBad bool
	promote bool
}

// runFork is what happened in one fork, as --json shows it.
type runFork struct {
	Index    int      `json:"index"`
	Name     string   `json:"name"`
	ExitCode int      `json:"exit_code"` // -1 when the command did not run to its end
	Seconds  float64  `json:"seconds"`   // from the command's start to its end
	Log      string   `json:"log,omitempty"`
	Copied   []string `json:"copied,omitempty"` // the host paths written
	Error    string   `json:"error,omitempty"`  // why it failed, other than its exit status
	Kept     bool     `json:"kept"`

	err error // a failure to run the command at all
}

func (f *runFork) failed() bool { return f.ExitCode != 0 || f.Error != "" }

// runResult is boxd run's --json answer.
type runResult struct {
	ForkOf      string                `json:"fork_of"`
	ExitCode    int                   `json:"exit_code"`
	ForkSeconds float64               `json:"fork_seconds"` // making the forks
	Seconds     float64               `json:"seconds"`      // the whole run, removal included
	Interrupted string                `json:"interrupted,omitempty"`
	Forks       []runFork             `json:"forks"`
	Promoted    *daemon.PromoteResult `json:"promoted,omitempty"`
}

// runInterrupt is the cause of a run's context ending early.
type runInterrupt struct {
	what string
	code int
}

func (e *runInterrupt) Error() string { return "interrupted by " + e.what }

// parseRun checks boxd run's arguments.
func parseRun(c *cli.Context) (runOptions, error) {
	o := runOptions{
		warm: c.String("fork-of"), logs: c.String("logs"), timeout: c.Duration("timeout"),
		keep: c.Bool("keep"), keepBad: c.Bool("keep-on-failure"), promote: c.Bool("promote"),
	}
	o.cmd = c.Args().Slice()
	if len(o.cmd) > 0 && o.cmd[0] == "--" {
		o.cmd = o.cmd[1:]
	}
	if o.warm == "" {
		return o, usageError("boxd run needs --fork-of WARM, the box to fork")
	}
	if err := box.ValidateName(o.warm); err != nil {
		return o, fmt.Errorf("--fork-of: %w", err)
	}
	if len(o.cmd) == 0 {
		return o, usageError("usage: boxd run --fork-of WARM [flags] -- CMD [ARGS...] (no command given)")
	}
	n := c.Int("count")
	if n < 1 || n > maxForks {
		return o, usageError("--count %d: want 1 to %d", n, maxForks)
	}
	if c.IsSet("timeout") && o.timeout <= 0 {
		return o, usageError("--timeout %s: want a positive duration", o.timeout)
	}
	if o.promote && (n != 1 || o.keep) {
		return o, usageError("--promote makes one fork the new %s: it needs --count 1 and no --keep", o.warm)
	}
	prefix := c.String("name-prefix")
	if prefix == "" {
		prefix = defaultRunPrefix(o.warm, n)
	}
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("%s-%d", prefix, i)
		if err := box.ValidateName(name); err != nil {
			return o, fmt.Errorf("--name-prefix: %w", err)
		}
		o.names = append(o.names, name)
	}
	for _, kv := range c.StringSlice("env") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !daemon.ValidEnvName(k) {
			return o, usageError("--env %q: want K=V, K of letters, digits and '_', not starting with a digit", kv)
		}
		if o.env == nil {
			o.env = map[string]string{}
		}
		o.env[k] = v
	}
	for _, s := range c.StringSlice("copy-out") {
		bp, hp, ok := strings.Cut(s, ":")
		if !ok || bp == "" || hp == "" {
			return o, usageError("--copy-out %q: want BOXPATH:HOSTPATH", s)
		}
		if b := path.Base(path.Clean(bp)); b == "/" || b == "." || b == ".." {
			return o, usageError("--copy-out %q: BOXPATH must name a file or folder", s)
		}
		if n > 1 && !strings.Contains(hp, indexMark) {
			return o, usageError("--copy-out %q: with --count %d, HOSTPATH must hold {i}, or the forks would write over each other", s, n)
		}
		o.copies = append(o.copies, copySpec{box: bp, host: hp})
	}
	return o, nil
}

// defaultRunPrefix is WARM-run-XXXX, WARM shortened so that the forks'
// names fit a box name.
func defaultRunPrefix(warm string, n int) string {
	var b [2]byte
	_, _ = rand.Read(b[:])
	suffix := "-run-" + hex.EncodeToString(b[:])
	room := 63 - len(suffix) - 1 - len(strconv.Itoa(n))
	if len(warm) > room {
		warm = strings.TrimRight(warm[:room], "-")
	}
	return warm + suffix
}

// withIndex replaces {i} in s by index i.
func withIndex(s string, i int) string { return strings.ReplaceAll(s, indexMark, strconv.Itoa(i)) }

func boxRun(c *cli.Context) error {
	o, err := parseRun(c)
	if err != nil {
		return err
	}
	d, _, err := daemonClient(c)
	if err != nil {
		return err
	}
	if _, err := d.Get(c.Context, o.warm); err != nil {
		return fmt.Errorf("--fork-of: %w", err)
	}
	if o.logs != "" {
		if err := os.MkdirAll(o.logs, 0o755); err != nil {
			return fmt.Errorf("--logs: %w", err)
		}
	}

	// The run's context ends on SIGINT, SIGTERM or SIGHUP, on --timeout, or
	// with the caller's; which one is kept to choose the exit status.
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(c.Context))
	defer cancel(nil)
	stopParent := context.AfterFunc(c.Context, func() { cancel(&runInterrupt{what: "cancellation", code: exitSignal + int(syscall.SIGINT)}) })
	defer stopParent()
	var caught atomic.Pointer[runInterrupt]
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			n := int(s.(syscall.Signal))
			if caught.CompareAndSwap(nil, &runInterrupt{what: s.String(), code: exitSignal + n}) {
				cancel(caught.Load())
			}
		}
	}()
	stopTimer := func() bool { return false }
	if o.timeout > 0 {
		t := time.AfterFunc(o.timeout, func() { cancel(&runInterrupt{what: "--timeout " + o.timeout.String(), code: exitTimeout}) })
		stopTimer = t.Stop
	}
	defer stopTimer()

	res := runResult{ForkOf: o.warm, Forks: make([]runFork, len(o.names))}
	start := time.Now()
	say(c, "forking box %s into %s…", o.warm, strings.Join(o.names, ", "))
	// The fork goes on in the daemon whatever the client does, so it is
	// waited for: only then are all the forks known, to be removed.
	_, forkErr := d.Fork(context.WithoutCancel(ctx), o.warm, o.names)
	res.ForkSeconds = time.Since(start).Seconds()
	for i, n := range o.names {
		res.Forks[i] = runFork{Index: i + 1, Name: n, ExitCode: -1}
	}
	if forkErr == nil && ctx.Err() == nil {
		runForks(ctx, c, d, o, res.Forks)
	}
	stopTimer() // the commands are done: the rest is not timed out

	// Interrupted runs record why; the exit status follows from it.
	var intr *runInterrupt
	if ctx.Err() != nil {
		// A signal's handler records it before cancelling; a later one
		// may beat the timeout's cause.
		if p := caught.Load(); p != nil {
			intr = p
		} else if !errors.As(context.Cause(ctx), &intr) {
			intr = &runInterrupt{what: "cancellation", code: exitSignal + int(syscall.SIGINT)}
		}
		res.Interrupted = intr.what
	}

	if forkErr == nil && o.promote && intr == nil && !res.Forks[0].failed() {
		pr, err := d.Promote(context.WithoutCancel(ctx), o.warm, o.names[0])
		if err != nil {
			res.Forks[0].Error = "promote: " + err.Error()
			res.Forks[0].err = fmt.Errorf("promoting fork %s to %s: %w", o.names[0], o.warm, err)
		} else {
			res.Promoted = &pr
			res.Forks[0].Kept = true // it is WARM now
		}
	}
	rmErr := removeForks(ctx, c, d, o, res.Forks, forkErr, start, intr != nil)
	res.Seconds = time.Since(start).Seconds()

	if forkErr != nil {
		return fmt.Errorf("forking %s: %w", o.warm, forkErr)
	}
	res.ExitCode = runExit(res.Forks, intr)
	var runErr error
	for _, f := range res.Forks {
		if f.err != nil && intr == nil {
			runErr = fmt.Errorf("fork %s: %w", f.Name, f.err)
			break
		}
	}
	if runErr == nil && res.ExitCode == 0 && rmErr != nil {
		runErr = rmErr
	}
	if wantJSON(c) {
		if err := printJSON(c, res); err != nil {
			return err
		}
	} else {
		summarise(c, o, res)
	}
	if runErr != nil {
		return runErr
	}
	if res.ExitCode != 0 {
		return commandExit(res.ExitCode)
	}
	return nil
}

// runExit is the run's exit status: the interruption's, else 0 if every
// fork succeeded, else the first failed fork's command status (1 when the
// command succeeded and the copy-out failed).
func runExit(forks []runFork, intr *runInterrupt) int {
	if intr != nil {
		return intr.code
	}
	for _, f := range forks {
		if !f.failed() {
			continue
		}
		switch {
		case f.ExitCode > 0 && f.ExitCode <= 255:
			return f.ExitCode
		case f.ExitCode == 0 || f.ExitCode == -1:
			return 1
		default:
			return 255
		}
	}
	return 0
}

// runForks runs the command in every fork at once and copies their files
// out, filling forks.
func runForks(ctx context.Context, c *cli.Context, d *daemon.Client, o runOptions, forks []runFork) {
	stdout, stderr := c.App.Writer, c.App.ErrWriter
	if wantJSON(c) {
		stdout = stderr
	}
	var mu sync.Mutex // whole lines from the forks
	var wg sync.WaitGroup
	for i := range forks {
		f := &forks[i]
		wg.Go(func() {
			out, errOut := stdout, stderr
			var flush func()
			switch {
			case o.logs != "":
				f.Log = filepath.Join(o.logs, strconv.Itoa(f.Index)+".log")
				lf, err := os.Create(f.Log)
				if err != nil {
					f.Error, f.err = err.Error(), fmt.Errorf("--logs: %w", err)
					return
				}
				defer lf.Close()
				out, errOut = lf, lf
			case len(forks) > 1:
				po := &prefixWriter{mu: &mu, w: stdout, prefix: f.Name + " | "}
				pe := &prefixWriter{mu: &mu, w: stderr, prefix: f.Name + " | "}
				out, errOut = po, pe
				flush = func() { po.Flush(); pe.Flush() }
			}
			runOne(ctx, d, o, f, out, errOut)
			if flush != nil {
				flush()
			}
		})
	}
	wg.Wait()
}

// runOne runs the command in fork f, then its copy-outs.
func runOne(ctx context.Context, d *daemon.Client, o runOptions, f *runFork, out, errOut io.Writer) {
	args := make([]string, len(o.cmd))
	for j, a := range o.cmd {
		args[j] = withIndex(a, f.Index)
	}
	var env map[string]string
	if o.env != nil {
		env = map[string]string{}
		for k, v := range o.env {
			env[k] = withIndex(v, f.Index)
		}
	}
	start := time.Now()
	code, err := d.ExecStream(ctx, f.Name, daemon.ExecOptions{Args: args, Env: env, Stdout: out, Stderr: errOut})
	f.Seconds = time.Since(start).Seconds()
	if err != nil {
		f.Error = err.Error()
		if ctx.Err() == nil {
			f.err = err
		}
		return
	}
	f.ExitCode = code
	var problems []string
	for _, cp := range o.copies {
		bp, hp := withIndex(cp.box, f.Index), withIndex(cp.host, f.Index)
		if err := copyOut(ctx, d, f.Name, bp, hp); err != nil {
			problems = append(problems, err.Error())
			fmt.Fprintf(errOut, "boxd run: fork %s: %v\n", f.Name, err)
			continue
		}
		f.Copied = append(f.Copied, hp)
	}
	if len(problems) > 0 {
		f.Error = strings.Join(problems, "; ")
	}
}

// removeForks removes the run's forks but those kept (and a promoted
// one), with a context of its own: the run's may have ended. After a
// failed fork (forkErr), the names that became forks of WARM since the
// run's start are removed; none when a name was taken, which the fork
// refuses before it makes any.
func removeForks(ctx context.Context, c *cli.Context, d *daemon.Client, o runOptions, forks []runFork, forkErr error, start time.Time, interrupted bool) error {
	rmCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), removeTimeout)
	defer cancel()
	forkFailed := forkErr != nil
	exists := map[string]bool{}
	if forkFailed && !errors.Is(forkErr, errdefs.ErrAlreadyExists) {
		boxes, err := d.List(rmCtx)
		if err != nil {
			return fmt.Errorf("listing boxes to remove the forks: %w", err)
		}
		for _, b := range boxes {
			exists[b.Name] = b.Parent == o.warm && !b.Created.Before(start.Add(-time.Second))
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for i := range forks {
		f := &forks[i]
		if forkFailed && !exists[f.Name] || f.Kept {
			continue
		}
		if !forkFailed && (o.keep || o.keepBad && f.failed() && (!interrupted || timeoutOnly(ctx))) {
			f.Kept = true
			continue
		}
		wg.Go(func() {
			if err := d.Remove(rmCtx, f.Name); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				mu.Lock()
				errs = append(errs, fmt.Errorf("removing fork %s: %w", f.Name, err))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		fmt.Fprintf(c.App.ErrWriter, "boxd run: %v\n", err)
	}
	return errors.Join(errs...)
}

// timeoutOnly reports whether the run's context ended by its --timeout
// (whose forks --keep-on-failure keeps), not by a signal.
func timeoutOnly(ctx context.Context) bool {
	var intr *runInterrupt
	return errors.As(context.Cause(ctx), &intr) && intr.code == exitTimeout
}

// summarise writes a line per fork on stderr when there are several, or
// logs, and what promote did.
func summarise(c *cli.Context, o runOptions, res runResult) {
	w := c.App.ErrWriter
	if len(res.Forks) > 1 || o.logs != "" || res.Interrupted != "" {
		for _, f := range res.Forks {
			status := "exit " + strconv.Itoa(f.ExitCode)
			if f.ExitCode < 0 {
				status = "did not finish"
			}
			line := fmt.Sprintf("boxd run: fork %d (%s): %s in %.1fs", f.Index, f.Name, status, f.Seconds)
			if f.Log != "" {
				line += ", log " + f.Log
			}
			if f.Kept {
				line += ", kept"
			}
			fmt.Fprintln(w, line)
		}
	}
	if res.Interrupted != "" {
		fmt.Fprintf(w, "boxd run: %s: the commands were stopped and the forks removed\n", res.Interrupted)
	}
	if p := res.Promoted; p != nil {
		fmt.Fprintf(w, "boxd run: %s is now fork %s's state; its previous state is snapshot %s\n", o.warm, o.names[0], p.Kept)
	}
}

// prefixWriter writes whole lines to w, each after prefix, under mu;
// Flush writes a last unfinished line.
type prefixWriter struct {
	mu     *sync.Mutex
	w      io.Writer
	prefix string
	buf    []byte
}

// maxLine is where a line without an end is cut.
const maxLine = 64 << 10

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.buf = append(p.buf, b...)
	for {
		i := strings.IndexByte(string(p.buf), '\n')
		if i < 0 && len(p.buf) < maxLine {
			return len(b), nil
		}
		if i < 0 {
			i = len(p.buf) - 1
		}
		p.line(p.buf[:i+1])
		p.buf = p.buf[i+1:]
	}
}

func (p *prefixWriter) line(l []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := append([]byte(p.prefix), l...)
	if out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	_, _ = p.w.Write(out)
}

// Flush writes what is left of an unfinished line.
func (p *prefixWriter) Flush() {
	if len(p.buf) > 0 {
		p.line(p.buf)
		p.buf = nil
	}
}
