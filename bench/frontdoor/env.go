package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
	"github.com/boxd-dev/boxd/guest"
)

// bench is one run: the daemon of the kept root, the private sshd, the
// client's key, and what the clean-up found.
type bench struct {
	boxd string // the boxd binary
	dir  string // the kept folder
	root string // dir/root, the daemon's root
	work string // this run's folder under dir (keys, sshd's files); removed at the end
	key  string // the client's private key; key+".pub" is authorized by the boxes and sshd

	port     string // the daemon's SSH front door
	sshdPort string

	daemon     *exec.Cmd
	daemonDone chan struct{} // closed once the daemon has exited
	sshd       *exec.Cmd
	sshdDone   chan struct{}

	tornDown bool
	cleanup  Cleanup
}

// Cleanup is what the end of the run removed and found.
type Cleanup struct {
	BoxesRemoved int `json:"boxes_removed"`
	// SnapshotsRemoved and DisksRemoved are what boxd kept of removed boxes:
	// their snapshots (box.*) in the store and overlay files in ROOT/disks.
	SnapshotsRemoved int   `json:"box_snapshots_removed"`
	DisksRemoved     int   `json:"disk_files_removed"`
	GCFreedBytes     int64 `json:"gc_freed_bytes"`
	// ProcessesLeft are pgrep's lines for QEMU or a daemon of this root
	// once the daemon had stopped (killed then); none is the goal.
	ProcessesLeft []string `json:"processes_left"`
}

// Names of the boxes the run makes.
const (
	door = "door" // the measured box
	seed = "seed" // the small box the many are forked from
)

// setUp makes or finds the image, clears what an earlier run left, and
// starts the daemon and the private sshd. The bench it returns (also on
// failure, once there is one) must be torn down.
func setUp(ctx context.Context) (*bench, error) {
	d, err := filepath.Abs(*dir)
	if err != nil {
		return nil, err
	}
	bin, err := exec.LookPath(*boxdBin)
	if err != nil {
		return nil, fmt.Errorf("the boxd binary (make build): %w", err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return nil, err
	}
	for _, tool := range []string{"ssh", "ssh-keygen", "pgrep", "qemu-system-x86_64"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s is missing (bench/frontdoor.sh installs it): %w", tool, err)
		}
	}
	if _, err := sshdPath(); err != nil {
		return nil, err
	}
	b := &bench{boxd: bin, dir: d, root: filepath.Join(d, "root")}
	if err := os.MkdirAll(b.root, 0o700); err != nil {
		return nil, err
	}
	if b.work, err = os.MkdirTemp(d, "run-"); err != nil {
		return nil, err
	}
	if err := os.WriteFile(b.daemonLog(), nil, 0o600); err != nil {
		return b, err
	}
	benchkit.Progress("root %s (kept: store, image, kernel), daemon log %s, this run's files in %s", b.root, b.daemonLog(), b.work)

	if err := b.ensureImage(ctx); err != nil {
		return b, err
	}
	b.key = filepath.Join(b.work, "id_ed25519")
	if err := keygen(ctx, b.key); err != nil {
		return b, err
	}
	if b.port, err = freePort(); err != nil {
		return b, err
	}

	// A run cut short leaves boxes, and the snapshots boxd keeps of them,
	// which only a stopped daemon's store can drop.
	left, err := b.boxSnapshots(ctx)
	if err != nil {
		return b, err
	}
	if err := b.startDaemon(ctx); err != nil {
		return b, err
	}
	n, err := b.removeBoxes(ctx)
	if err != nil {
		return b, fmt.Errorf("removing an earlier run's boxes: %w", err)
	}
	if n > 0 || len(left) > 0 {
		benchkit.Progress("an earlier run left %d boxes and %d box snapshots: removed", n, len(left))
	}
	if len(left) > 0 {
		if err := b.stopDaemon(); err != nil {
			return b, err
		}
		if _, err := b.clearStore(ctx); err != nil {
			return b, err
		}
		if err := b.startDaemon(ctx); err != nil {
			return b, err
		}
	}
	if err := b.startSSHD(ctx); err != nil {
		return b, err
	}
	return b, nil
}

func (b *bench) daemonLog() string { return filepath.Join(b.dir, "daemon.log") }

// ensureImage builds the default image unless the root has it: from the
// debootstrap tree under -cache when that is complete (holding its lock
// while it is read), else with debootstrap (cached in ROOT/cache/rootfs).
func (b *bench) ensureImage(ctx context.Context) error {
	_, out, err := b.cli(ctx, "image", "ls", "--json")
	if err != nil {
		return err
	}
	var imgs []named
	if err := json.Unmarshal(out, &imgs); err != nil {
		return fmt.Errorf("boxd image ls --json: %w", err)
	}
	if slices.Contains(imgs, named{guest.DefaultImage}) {
		return nil
	}
	args := []string{"image", "build"}
	tree, unlock, err := benchkit.CachedTree(*treeCache, guest.DefaultImage)
	if err != nil {
		return err
	}
	defer unlock()
	if tree != "" {
		args = append(args, "--tree", tree)
	}
	took, _, err := b.cli(ctx, args...)
	if err != nil {
		return err
	}
	benchkit.Progress("image built in %s", secs(took))
	return nil
}

// timed runs a command and returns its wall time, from just before it
// starts to its exit, and its stdout; a non-zero exit is an error that
// carries its stderr.
func timed(ctx context.Context, name string, args ...string) (time.Duration, []byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	if err != nil {
		return took, out.Bytes(), fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return took, out.Bytes(), nil
}

// cli runs boxd on the root.
func (b *bench) cli(ctx context.Context, args ...string) (time.Duration, []byte, error) {
	return timed(ctx, b.boxd, append([]string{"--root", b.root}, args...)...)
}

// sshOpts are the OpenSSH client's options for every connection: no
// configuration file, a fresh connection, the run's key only.
func (b *bench) sshOpts() []string {
	return []string{"-F", "none",
		"-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes", "-i", b.key}
}

// sshTrue runs `true` as user on 127.0.0.1:port with the real OpenSSH
// client; extra are more options.
func (b *bench) sshTrue(ctx context.Context, port, user string, extra ...string) (time.Duration, error) {
	args := append(b.sshOpts(), "-o", "LogLevel=ERROR")
	args = append(append(args, extra...), "-p", port, user+"@127.0.0.1", "true")
	took, _, err := timed(ctx, "ssh", args...)
	return took, err
}

// kex is the key exchange the client and the server on port agree on.
func (b *bench) kex(ctx context.Context, port, user string) (string, error) {
	args := append(b.sshOpts(), "-v", "-p", port, user+"@127.0.0.1", "true")
	cmd := exec.CommandContext(ctx, "ssh", args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ssh -v to port %s: %w: %s", port, err, bytes.TrimSpace(out))
	}
	for l := range strings.Lines(string(out)) {
		if _, k, ok := strings.Cut(l, "kex: algorithm: "); ok {
			return strings.TrimSpace(k), nil
		}
	}
	return "", fmt.Errorf("ssh -v to port %s named no kex algorithm", port)
}

// listBoxes is `boxd ls --json`: each box's name and state.
func (b *bench) listBoxes(ctx context.Context) ([]boxInfo, error) {
	_, out, err := b.cli(ctx, "ls", "--json")
	if err != nil {
		return nil, err
	}
	var bs []boxInfo
	if err := json.Unmarshal(out, &bs); err != nil {
		return nil, fmt.Errorf("boxd ls --json: %w", err)
	}
	return bs, nil
}

// named is the name field of what boxd lists in JSON.
type named struct {
	Name string `json:"name"`
}

type boxInfo struct {
	Name  string `json:"name"`
	State string `json:"state"`
}

// apiList is the daemon's list of boxes over its API socket, on a fresh
// connection: what `boxd ls` asks, without starting a process.
func (b *bench) apiList(ctx context.Context) (time.Duration, error) {
	socket := filepath.Join(b.root, "boxd.sock")
	c := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://boxd/v1/boxes", nil)
	if err != nil {
		return 0, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, err
	}
	took := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		return took, fmt.Errorf("GET /v1/boxes: %s", resp.Status)
	}
	return took, nil
}

// removeBoxes removes every box of the root and returns how many.
func (b *bench) removeBoxes(ctx context.Context) (int, error) {
	bs, err := b.listBoxes(ctx)
	if err != nil {
		return 0, err
	}
	var errs []error
	n := 0
	for _, bx := range bs {
		if _, _, err := b.cli(ctx, "rm", bx.Name); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// startDaemon starts boxd daemon on the root, in its own process group
// (a ^C reaches the bench, which removes the boxes first) and killed should
// the bench die (its QEMUs die with it), and waits for its API socket and
// SSH port.
func (b *bench) startDaemon(ctx context.Context) error {
	log, err := os.OpenFile(b.daemonLog(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	_ = os.Remove(filepath.Join(b.root, "boxd.sock")) // a killed daemon's; the new one makes its own
	cmd := exec.Command(b.boxd, "--root", b.root, "daemon", "--ssh-listen", "127.0.0.1:"+b.port, "--idle-hibernate", "0")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting boxd daemon: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	b.daemon, b.daemonDone = cmd, done
	if err := waitUp(ctx, done, b.port, filepath.Join(b.root, "boxd.sock")); err != nil {
		return fmt.Errorf("boxd daemon: %w (its log: %s)", err, b.daemonLog())
	}
	benchkit.Progress("boxd daemon up (pid %d): SSH front door on 127.0.0.1:%s", cmd.Process.Pid, b.port)
	return nil
}

// stopDaemon stops the daemon with SIGTERM (it hibernates running boxes
// first), killing it after two minutes.
func (b *bench) stopDaemon() error {
	if b.daemon == nil {
		return nil
	}
	cmd, done := b.daemon, b.daemonDone
	b.daemon = nil
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		return errors.New("boxd daemon did not stop on SIGTERM within 2 minutes: killed")
	}
	if st := cmd.ProcessState; st != nil && !st.Success() {
		return fmt.Errorf("boxd daemon exited: %s (its log: %s)", st, b.daemonLog())
	}
	return nil
}

// waitUp waits until the TCP port on 127.0.0.1 answers and the socket, if
// any, exists, or the process is done.
func waitUp(ctx context.Context, done <-chan struct{}, port, socket string) error {
	deadline := time.Now().Add(time.Minute)
	for {
		select {
		case <-done:
			return errors.New("exited while starting")
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		sockOK := socket == ""
		if !sockOK {
			_, err := os.Stat(socket)
			sockOK = err == nil
		}
		if sockOK {
			if c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, time.Second); err == nil {
				c.Close()
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not up after a minute (port %s)", port)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func sshdPath() (string, error) {
	if p, err := exec.LookPath("sshd"); err == nil {
		return filepath.Abs(p)
	}
	if _, err := os.Stat("/usr/sbin/sshd"); err != nil {
		return "", errors.New("sshd is missing (Debian's openssh-server; bench/frontdoor.sh installs it)")
	}
	return "/usr/sbin/sshd", nil
}

// startSSHD starts the baseline: Debian's stock sshd on a free port of
// 127.0.0.1 with its own configuration, host key and authorized key in
// the run's folder, public key authentication only, logging in as root.
func (b *bench) startSSHD(ctx context.Context) error {
	sshd, err := sshdPath() // an absolute path: sshd re-executes itself
	if err != nil {
		return err
	}
	sd := filepath.Join(b.work, "sshd")
	if err := os.MkdirAll(sd, 0o700); err != nil {
		return err
	}
	hostKey := filepath.Join(sd, "ssh_host_ed25519_key")
	if err := keygen(ctx, hostKey); err != nil {
		return err
	}
	pub, err := os.ReadFile(b.key + ".pub")
	if err != nil {
		return err
	}
	authorized := filepath.Join(sd, "authorized_keys")
	if err := os.WriteFile(authorized, pub, 0o600); err != nil {
		return err
	}
	home := filepath.Join(sd, "home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return err
	}
	if b.sshdPort, err = freePort(); err != nil {
		return err
	}
	config := filepath.Join(sd, "sshd_config")
	conf := strings.Join([]string{
		"Port " + b.sshdPort,
		"ListenAddress 127.0.0.1",
		"HostKey " + hostKey,
		"PidFile " + filepath.Join(sd, "sshd.pid"),
		"AuthorizedKeysFile " + authorized,
		"AuthenticationMethods publickey",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"PermitRootLogin prohibit-password",
		"UsePAM no",
		"StrictModes no", // the run's folder is under /var/tmp, which sshd's mode checks refuse
		"UseDNS no",
		// Debian's bash reads ~/.bashrc when sshd runs it: an empty HOME keeps
		// the host root's shell start-up out of the figure (a box's agent
		// runs commands with /bin/sh -c).
		"SetEnv HOME=" + home,
		"PrintMotd no",
		"PrintLastLog no",
	}, "\n") + "\n"
	if err := os.WriteFile(config, []byte(conf), 0o600); err != nil {
		return err
	}
	// The privilege separation folder Debian's service makes at start.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		return err
	}
	if _, _, err := timed(ctx, sshd, "-t", "-f", config); err != nil {
		return fmt.Errorf("the baseline sshd's configuration: %w", err)
	}
	log, err := os.Create(filepath.Join(sd, "sshd.log"))
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(sshd, "-D", "-e", "-f", config)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting sshd: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	b.sshd, b.sshdDone = cmd, done
	if err := waitUp(ctx, done, b.sshdPort, ""); err != nil {
		out, _ := os.ReadFile(log.Name())
		return fmt.Errorf("the baseline sshd: %w: %s", err, bytes.TrimSpace(out))
	}
	benchkit.Progress("baseline sshd up (pid %d, %s) on 127.0.0.1:%s, key authentication only", cmd.Process.Pid, sshd, b.sshdPort)
	return nil
}

func (b *bench) stopSSHD() {
	if b.sshd == nil {
		return
	}
	_ = b.sshd.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.sshdDone:
	case <-time.After(10 * time.Second):
		_ = b.sshd.Process.Kill()
		<-b.sshdDone
	}
	b.sshd = nil
}

func keygen(ctx context.Context, path string) error {
	_, _, err := timed(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "boxd-bench-frontdoor", "-f", path)
	return err
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port), nil
}

// boxSnapshots names the store's box snapshots (box.NAME.SNAP), parents
// first. The daemon must not be running: it owns the store.
func (b *bench) boxSnapshots(ctx context.Context) ([]string, error) {
	_, out, err := b.cli(ctx, "store", "ls", "--json")
	if err != nil {
		return nil, err
	}
	var snaps []named
	if err := json.Unmarshal(out, &snaps); err != nil {
		return nil, fmt.Errorf("boxd store ls --json: %w", err)
	}
	var names []string
	for _, s := range snaps {
		if strings.HasPrefix(s.Name, "box.") {
			names = append(names, s.Name)
		}
	}
	return names, nil
}

// clearStore drops what boxd keeps of removed boxes: their snapshots
// (children first), the store's garbage, and the overlay files left in
// ROOT/disks. Only for a root with no boxes and no daemon running.
func (b *bench) clearStore(ctx context.Context) (Cleanup, error) {
	var c Cleanup
	snaps, err := b.boxSnapshots(ctx)
	if err != nil {
		return c, err
	}
	for i := len(snaps) - 1; i >= 0; i-- {
		if _, _, err := b.cli(ctx, "store", "rm", snaps[i]); err != nil {
			return c, err
		}
		c.SnapshotsRemoved++
	}
	_, out, err := b.cli(ctx, "store", "gc", "--json")
	if err != nil {
		return c, err
	}
	var gc struct {
		Freed int64 `json:"bytes_freed"`
	}
	if err := json.Unmarshal(out, &gc); err != nil {
		return c, fmt.Errorf("boxd store gc --json: %w", err)
	}
	c.GCFreedBytes = gc.Freed
	disks, _ := filepath.Glob(filepath.Join(b.root, "disks", "*"))
	for _, f := range disks {
		if err := os.Remove(f); err != nil {
			return c, err
		}
		c.DisksRemoved++
	}
	return c, nil
}

// leftProcesses lists (pgrep -a) the QEMUs and daemons of the root.
func (b *bench) leftProcesses(ctx context.Context) ([]string, []int) {
	var lines []string
	var pids []int
	for _, pat := range []string{
		`qemu-system-x86_64 .*` + regexp.QuoteMeta(b.root+"/"),
		regexp.QuoteMeta("--root " + b.root + " daemon"),
	} {
		out, _ := exec.CommandContext(ctx, "pgrep", "-a", "-f", "--", pat).Output() // exit 1: none
		for l := range strings.Lines(string(out)) {
			l = strings.TrimSpace(l)
			pid, _, _ := strings.Cut(l, " ")
			if n, err := strconv.Atoi(pid); err == nil && !slices.Contains(pids, n) {
				pids = append(pids, n)
				lines = append(lines, l)
			}
		}
	}
	return lines, pids
}

// tearDown removes every box, stops the daemon and sshd, checks that no
// QEMU of the root is left (killing any), drops what boxd kept of the
// boxes, and removes the run's folder. A second call does nothing.
func (b *bench) tearDown() error {
	if b == nil || b.tornDown {
		return nil
	}
	b.tornDown = true
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var errs []error
	boxesGone := false
	if b.daemon != nil {
		n, err := b.removeBoxes(ctx)
		b.cleanup.BoxesRemoved = n
		if err != nil {
			errs = append(errs, fmt.Errorf("removing boxes: %w", err))
		} else {
			boxesGone = true
		}
		if err := b.stopDaemon(); err != nil {
			errs = append(errs, err)
		}
	}
	b.stopSSHD()
	lines, pids := b.leftProcesses(ctx)
	b.cleanup.ProcessesLeft = lines
	if len(lines) > 0 {
		errs = append(errs, fmt.Errorf("left running after the daemon stopped (killed now): %s", strings.Join(lines, "; ")))
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if boxesGone {
		c, err := b.clearStore(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("dropping the removed boxes' snapshots: %w", err))
		}
		b.cleanup.SnapshotsRemoved, b.cleanup.DisksRemoved, b.cleanup.GCFreedBytes = c.SnapshotsRemoved, c.DisksRemoved, c.GCFreedBytes
	}
	if b.work != "" {
		if err := os.RemoveAll(b.work); err != nil {
			errs = append(errs, err)
		}
	}
	benchkit.Progress("cleaned up: %d boxes removed; boxd had kept %d of their snapshots and %d overlay files in %s (dropped, gc freed %s); QEMUs or daemons of the root left: %d",
		b.cleanup.BoxesRemoved, b.cleanup.SnapshotsRemoved, b.cleanup.DisksRemoved, filepath.Join(b.root, "disks"), benchkit.Size(b.cleanup.GCFreedBytes), len(lines))
	return errors.Join(errs...)
}

// showDaemonLog prints the end of the daemon's log on stderr.
func (b *bench) showDaemonLog() {
	if b == nil {
		return
	}
	data, err := os.ReadFile(b.daemonLog())
	if err != nil || len(data) == 0 {
		return
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	fmt.Fprintf(os.Stderr, "the end of %s:\n", b.daemonLog())
	for _, l := range lines[max(0, len(lines)-20):] {
		fmt.Fprintf(os.Stderr, "  %s\n", l)
	}
}
