package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// pings is how many times clockSkew asks a guest for its clock.
const pings = 5

// skew is a guest's clock less the host's, within plusMinus.
type skew struct {
	d, plusMinus time.Duration
}

// clockSkew is box name's clock less the host's. One boxd exec runs a
// shell in the box that answers each line it reads with `date +%s%N`; the
// host writes a line pings times, each once the last answer is back, and
// takes the answer least far from the middle of the host's times around it:
// the guest read its clock between the two, so the skew is known within
// half the round trip, which in one session is far shorter than a boxd
// exec of its own.
func (b *bench) clockSkew(ctx context.Context, name string) (skew, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.boxd.Bin, "--root", b.boxd.Root, "exec", "-i", name, "--",
		"sh", "-c", "while read -r _; do date +%s%N; done")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	cmd.WaitDelay = 5 * time.Second
	in, err := cmd.StdinPipe()
	if err != nil {
		return skew{}, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return skew{}, err
	}
	if err := cmd.Start(); err != nil {
		return skew{}, err
	}
	best, err := ping(in, bufio.NewReader(out))
	in.Close()
	if werr := cmd.Wait(); werr != nil && err == nil {
		err = werr
	}
	if err != nil {
		return skew{}, fmt.Errorf("the clock of %s (boxd exec -i %s -- sh -c 'while read ...; do date +%%s%%N; done'): %w: %s",
			name, name, err, strings.TrimSpace(errb.String()))
	}
	return best, nil
}

// ping writes a line to in pings times, reads the guest's clock from out
// after each, and returns the narrowest skew.
func ping(in io.Writer, out *bufio.Reader) (skew, error) {
	var best skew
	for i := range pings {
		start := time.Now()
		if _, err := in.Write([]byte("x\n")); err != nil {
			return skew{}, err
		}
		line, err := out.ReadString('\n')
		took := time.Since(start)
		if err != nil {
			return skew{}, fmt.Errorf("no answer: %w", err)
		}
		g, err := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		if err != nil {
			return skew{}, fmt.Errorf("date +%%s%%N printed %q", line)
		}
		s := skew{d: time.Duration(g - (start.UnixNano() + int64(took/2))), plusMinus: took / 2}
		if i == 0 || s.plusMinus < best.plusMinus {
			best = s
		}
	}
	return best, nil
}
