package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
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
	boxd benchkit.Boxd // the boxd binary on DIR/root, the daemon's root
	dir  string        // the kept folder
	work string        // this run's folder under dir (keys, sshd's files); removed at the end
	key  string        // the client's private key; key+".pub" is authorized by the boxes and sshd

	port     string // the daemon's SSH front door
	sshdPort string

	daemon   *benchkit.Daemon
	sshd     *exec.Cmd
	sshdDone chan struct{}

	tornDown bool
	cleanup  benchkit.Cleanup
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
	bx, d, err := benchkit.OpenRoot(*dir, *boxdBin, "bench/frontdoor.sh", "ssh", "ssh-keygen", "pgrep", "qemu-system-x86_64")
	if err != nil {
		return nil, err
	}
	if _, err := sshdPath(); err != nil {
		return nil, err
	}
	b := &bench{boxd: bx, dir: d}
	if b.work, err = os.MkdirTemp(d, "run-"); err != nil {
		return nil, err
	}
	benchkit.Progress("root %s (kept: store, image, kernel), daemon log %s, this run's files in %s", b.boxd.Root, b.daemonLog(), b.work)

	took, err := b.boxd.EnsureImage(ctx, guest.DefaultImage, *treeCache)
	if err != nil {
		return b, err
	}
	if took > 0 {
		benchkit.Progress("image built in %s", secs(took))
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
	left, err := b.boxd.BoxSnapshots(ctx)
	if err != nil {
		return b, err
	}
	if err := b.startDaemon(ctx); err != nil {
		return b, err
	}
	n, err := b.boxd.RemoveBoxes(ctx)
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
		if _, err := b.boxd.ClearStore(ctx); err != nil {
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

func (b *bench) daemonLog() string { return benchkit.DaemonLog(b.dir) }

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
	took, _, err := benchkit.Timed(ctx, "ssh", args...)
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

// apiList is the daemon's list of boxes over its API socket, on a fresh
// connection: what `boxd ls` asks, without starting a process.
func (b *bench) apiList(ctx context.Context) (time.Duration, error) {
	socket := filepath.Join(b.boxd.Root, "boxd.sock")
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

// startDaemon starts boxd daemon on the root (benchkit.Boxd.StartDaemon)
// with the SSH front door on b.port.
func (b *bench) startDaemon(ctx context.Context) error {
	d, err := b.boxd.StartDaemon(ctx, b.daemonLog(), "--ssh-listen", "127.0.0.1:"+b.port, "--idle-hibernate", "0")
	if err != nil {
		return err
	}
	b.daemon = d
	benchkit.Progress("boxd daemon up (pid %d): SSH front door on 127.0.0.1:%s", d.Pid(), b.port)
	return nil
}

// stopDaemon stops the daemon with SIGTERM (it hibernates running boxes
// first), killing it after two minutes.
func (b *bench) stopDaemon() error {
	err := b.daemon.Stop()
	b.daemon = nil
	return err
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
	if _, _, err := benchkit.Timed(ctx, sshd, "-t", "-f", config); err != nil {
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
	_, _, err := benchkit.Timed(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "boxd-bench-frontdoor", "-f", path)
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

// tearDown removes every box, stops the daemon and sshd, checks that no
// QEMU of the root is left (killing any), drops what boxd kept of the
// boxes (benchkit.Boxd.Clean), and removes the run's folder. A second call
// does nothing.
func (b *bench) tearDown() error {
	if b == nil || b.tornDown {
		return nil
	}
	b.tornDown = true
	var errs []error
	c, err := b.boxd.Clean(b.daemon)
	b.daemon, b.cleanup = nil, c
	if err != nil {
		errs = append(errs, err)
	}
	b.stopSSHD()
	if b.work != "" {
		if err := os.RemoveAll(b.work); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// showDaemonLog prints the end of the daemon's log on stderr.
func (b *bench) showDaemonLog() {
	if b != nil {
		benchkit.ShowTail(b.daemonLog(), 20)
	}
}
