package main

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"

	"github.com/boxd-dev/boxd/bench/internal/benchkit"
)

// What the upload rows are compared with.
const (
	baseUpload     = "the same upload to Debian's OpenSSH sshd on the host, `cat >/dev/null` as root"
	baseDownload   = "the same download from Debian's OpenSSH sshd on the host, as root"
	baseExecIdle   = "`boxd exec BOX -- true` with the box idle (the rows above)"
	uploadChunkLen = 256 << 10
)

// measureUpload times `ssh BOX 'cat >/dev/null'` of -upload MiB of zeros
// through the front door beside the same upload to sshd, the same download
// (`head -c SIZE /dev/zero`) beside sshd's, and `boxd exec BOX
// -- true`, one after another, while such an upload runs beside the same
// exec with the box idle: the exec's request to the agent travels on the
// agent's one connection behind whatever of the upload the host has queued
// for the guest.
func (b *bench) measureUpload(ctx context.Context, rep *Report, idleExec []time.Duration) error {
	size := int64(*uploadMiB) << 20
	var toBox, toSSHD, fromBox, fromSSHD, busyExec []time.Duration
	for i := range *uploadReps {
		s, err := b.upload(ctx, b.sshdPort, "root", size, nil)
		if err != nil {
			return fmt.Errorf("upload to the baseline sshd: %w", err)
		}
		d, err := b.upload(ctx, b.port, door, size, nil)
		if err != nil {
			return fmt.Errorf("upload to box %s: %w", door, err)
		}
		sd, err := b.download(ctx, b.sshdPort, "root", size)
		if err != nil {
			return fmt.Errorf("download from the baseline sshd: %w", err)
		}
		dd, err := b.download(ctx, b.port, door, size)
		if err != nil {
			return fmt.Errorf("download from box %s: %w", door, err)
		}
		fromBox, fromSSHD = append(fromBox, dd), append(fromSSHD, sd)
		var execs []time.Duration
		u, err := b.upload(ctx, b.port, door, size, func(ctx context.Context, done <-chan struct{}) error {
			for {
				e, _, err := b.boxd.CLI(ctx, "exec", "--no-stdin", door, "--", "true")
				select {
				case <-done: // the upload ended during the exec: not a sample under load
					return nil
				default:
				}
				if err != nil {
					return err
				}
				execs = append(execs, e)
			}
		})
		if err != nil {
			return fmt.Errorf("upload to box %s with execs beside it: %w", door, err)
		}
		toBox, toSSHD, busyExec = append(toBox, d), append(toSSHD, s), append(busyExec, execs...)
		benchkit.Progress("upload %d/%d of %d MiB: box %s (%s), sshd %s (%s); download: box %s (%s), sshd %s (%s); upload with execs beside it %s, %d execs, p50 %s",
			i+1, *uploadReps, *uploadMiB, secs(d), rate(size, d), secs(s), rate(size, s), secs(dd), rate(size, dd), secs(sd), rate(size, sd),
			secs(u), len(execs), benchkit.Ms(benchkit.Percentile(execs, 50)))
	}
	if len(busyExec) == 0 {
		return fmt.Errorf("no `boxd exec` ended while an upload of %d MiB ran: make -upload larger", *uploadMiB)
	}
	rep.add(benchkit.PctRow(fmt.Sprintf("ssh `cat >/dev/null` of %d MiB, running box: p50", *uploadMiB), 50, "s", toBox, toSSHD, baseUpload))
	rep.add(benchkit.PctRow(fmt.Sprintf("ssh `head -c %d MiB /dev/zero`, running box: p50", *uploadMiB), 50, "s", fromBox, fromSSHD, baseDownload))
	for _, p := range []int{50, 95} {
		rep.add(benchkit.PctRow(fmt.Sprintf("`boxd exec BOX -- true` while an upload streams into BOX: p%d", p), p, "ms", busyExec, idleExec, baseExecIdle))
	}
	return nil
}

// upload sends size bytes of zeros to `cat >/dev/null` as user on
// 127.0.0.1:port with the real OpenSSH client and returns how long the
// client ran. When during is not nil, it runs once an eighth of the bytes
// went, with a channel closed when the client has exited; upload waits for
// it.
func (b *bench) upload(ctx context.Context, port, user string, size int64, during func(context.Context, <-chan struct{}) error) (time.Duration, error) {
	var errOut strings.Builder
	cmd := b.sshCommand(ctx, port, user, "cat >/dev/null", &errOut)
	in, err := cmd.StdinPipe()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	eighth := make(chan struct{})
	sent := make(chan error, 1)
	go func() {
		defer in.Close()
		buf := make([]byte, uploadChunkLen)
		for n := int64(0); n < size; {
			k := min(int64(len(buf)), size-n)
			if _, err := in.Write(buf[:k]); err != nil {
				sent <- err
				return
			}
			if n < size/8 && n+k >= size/8 {
				close(eighth)
			}
			n += k
		}
		sent <- nil
	}()
	exited := make(chan struct{})
	var waitErr error
	var took time.Duration
	go func() {
		waitErr = cmd.Wait()
		took = time.Since(start)
		close(exited)
	}()
	var duringErr error
	if during != nil {
		select {
		case <-eighth:
			duringErr = during(ctx, exited)
		case <-exited:
		}
	}
	<-exited
	if err := <-sent; err != nil && waitErr == nil {
		waitErr = fmt.Errorf("sending: %w", err)
	}
	if waitErr != nil {
		return took, fmt.Errorf("%w: %s", waitErr, strings.TrimSpace(errOut.String()))
	}
	return took, duringErr
}

// download reads size bytes of zeros that `head -c SIZE /dev/zero` writes as
// user on 127.0.0.1:port, with the real OpenSSH client, and returns how long
// the client ran.
func (b *bench) download(ctx context.Context, port, user string, size int64) (time.Duration, error) {
	var errOut strings.Builder
	cmd := b.sshCommand(ctx, port, user, fmt.Sprintf("head -c %d /dev/zero", size), &errOut)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	n, cerr := io.Copy(io.Discard, out)
	err = cmd.Wait()
	took := time.Since(start)
	switch {
	case err != nil:
		return took, fmt.Errorf("%w: %s", err, strings.TrimSpace(errOut.String()))
	case cerr != nil:
		return took, cerr
	case n != size:
		return took, fmt.Errorf("received %d bytes of %d", n, size)
	}
	return took, nil
}

// sshCommand is the real OpenSSH client to run command as user on
// 127.0.0.1:port, its standard error going to errOut.
func (b *bench) sshCommand(ctx context.Context, port, user, command string, errOut *strings.Builder) *exec.Cmd {
	args := append(b.sshOpts(), "-o", "LogLevel=ERROR", "-p", port, user+"@127.0.0.1", command)
	cmd := exec.CommandContext(ctx, "ssh", args...)
	cmd.Stderr = errOut
	return cmd
}

// rate is size bytes over d, in MB/s.
func rate(size int64, d time.Duration) string {
	return fmt.Sprintf("%.1f MB/s", float64(size)/1e6/d.Seconds())
}
