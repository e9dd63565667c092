package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
)

// busyResume times a resume of dev that hibernated while an upload streamed
// into it through the front door: `ssh dev sha256sum` reading -upload MiB
// of pseudo-random bytes, dev hibernated once a quarter of them have gone,
// `boxd resume dev` timed, then the rest sent and the guest's sum checked
// against the host's. The upload's SSH session lives through the hibernation
// (the front door holds it); the guest was frozen in the middle of the
// stream, likely inside one of the agent link's frames, and what the host had
// queued for it goes first once it resumes.
func (b *bench) busyResume(ctx context.Context, sd *side, phase string, rep *Report) (timedResume, error) {
	size := int64(*uploadMiB) << 20
	cmd := exec.CommandContext(ctx, "ssh", "-F", "none",
		"-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", b.key,
		"-p", b.port, dev+"@127.0.0.1", "sha256sum")
	in, err := cmd.StdinPipe()
	if err != nil {
		return timedResume{}, err
	}
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Start(); err != nil {
		return timedResume{}, fmt.Errorf("upload: %w", err)
	}
	quarter := make(chan struct{})
	sent := make(chan error, 1)
	sum := sha256.New()
	go func() {
		defer in.Close()
		src := rand.NewChaCha8([32]byte{'b', 'u', 's', 'y'})
		buf := make([]byte, 256<<10)
		var n int64
		for n < size {
			k := min(int64(len(buf)), size-n)
			_, _ = src.Read(buf[:k])
			sum.Write(buf[:k])
			if _, err := in.Write(buf[:k]); err != nil {
				sent <- err
				return
			}
			if n < size/4 && n+k >= size/4 {
				close(quarter)
			}
			n += k
		}
		sent <- nil
	}()
	fail := func(err error) (timedResume, error) {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return timedResume{}, err
	}
	select {
	case <-quarter:
	case err := <-sent:
		return fail(fmt.Errorf("upload ended before a quarter had gone: %w; ssh: %s", err, strings.TrimSpace(errOut.String())))
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	if err := b.hibernate(ctx, dev); err != nil {
		return fail(err)
	}
	r, err := b.resume(ctx, sd, dev, phase+" busy", rep)
	if err != nil {
		return fail(err)
	}
	if !r.ok { // back in its snapshot, which the upload's session did not outlive
		_, _ = fail(nil)
		return r, nil
	}
	if err := <-sent; err != nil {
		return fail(fmt.Errorf("upload: %w; ssh: %s", err, strings.TrimSpace(errOut.String())))
	}
	if err := cmd.Wait(); err != nil {
		return timedResume{}, fmt.Errorf("upload: ssh: %w: %s", err, strings.TrimSpace(errOut.String()))
	}
	want := hex.EncodeToString(sum.Sum(nil))
	if got, _, _ := strings.Cut(out.String(), " "); got != want {
		return timedResume{}, fmt.Errorf("upload through a hibernation: the guest's sha256 is %q, the host sent %s", got, want)
	}
	return r, nil
}
