package box_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/box/boxtest"
	"github.com/pkg/sftp"
	"golang.org/x/crypto/ssh"
)

// TestBoxLinkSurvives runs a counter on a terminal in a box over its agent client, as `ssh -t` through the front
// door does, and forks and hibernates the box while it prints: every number arrives once, in order, and the
// counter goes on after each. A 50 MiB file sent over sftp during a fork arrives whole. It does so for forks
// whose parent goes on in its machine and for forks whose parent moves to a new one. BOXD_LINK_FORKS sets the number of forks (3 by default).
func TestBoxLinkSurvives(t *testing.T) {
	for _, moves := range []bool{false, true} {
		name := "parent stays"
		if moves {
			name = "parent moves"
		}
		t.Run(name, func(t *testing.T) { testLinkSurvives(t, moves) })
	}
}

// testLinkSurvives is TestBoxLinkSurvives; moves sets Config.ForkMovesParent.
func testLinkSurvives(t *testing.T, moves bool) {
	forks := 3
	if n, err := strconv.Atoi(os.Getenv("BOXD_LINK_FORKS")); err == nil && n > 0 {
		forks = n
	}
	mgr, _ := boxtest.NewManagerBox(t, func(c *box.Config) { c.ForkMovesParent = moves })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if _, err := mgr.Create(ctx, box.CreateOptions{Name: "lk", Image: boxtest.Image, Memory: 256 << 20, Keys: []string{keyA}}); err != nil {
		t.Fatal(err)
	}
	c, err := mgr.Client(ctx, "lk")
	if err != nil {
		t.Fatal(err)
	}
	sess, err := c.SSH().NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if err := sess.RequestPty("xterm", 24, 80, ssh.TerminalModes{ssh.ECHO: 0}); err != nil {
		t.Fatal(err)
	}
	out, err := sess.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := sess.Start(`i=0; while :; do i=$((i+1)); echo "n $i"; sleep 0.02; done`); err != nil {
		t.Fatal(err)
	}
	lines := make(chan int, 1<<16)
	go readCounter(t, out, lines)
	last := 0
	// past waits until the counter has gone on by n numbers, checking each.
	past := func(what string, n int) {
		t.Helper()
		for want := last + n; last < want; {
			select {
			case got, ok := <-lines:
				if !ok {
					t.Fatalf("after %s: the session ended at %d", what, last)
				}
				if got != last+1 {
					t.Fatalf("after %s: %d came after %d", what, got, last)
				}
				last = got
			case <-ctx.Done():
				t.Fatalf("after %s: the counter stopped at %d", what, last)
			}
		}
	}
	past("the start", 5)

	// A 50 MiB file in flight over sftp (what scp uses) while the box forks arrives whole.
	file := randomFile(50 << 20)
	sent := make(chan error, 1)
	go func() { sent <- putFile(c.SSH(), "/root/big", file) }()
	if _, err := mgr.Fork(ctx, "lk", []string{"lk-scp"}); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("the file sent during the fork: %v", err)
	}
	want := sha256.Sum256(file)
	if got := strings.Fields(run(ctx, t, mgr, "lk", "sha256sum /root/big; rm /root/big")); len(got) == 0 || got[0] != hex.EncodeToString(want[:]) {
		t.Errorf("the file sent during the fork has sum %q, want %x", got, want)
	}
	if err := mgr.Remove(ctx, "lk-scp"); err != nil {
		t.Fatal(err)
	}
	past("the file", 3)

	for i := range forks {
		child := "lk-" + strconv.Itoa(i)
		began := time.Now()
		if _, err := mgr.Fork(ctx, "lk", []string{child}); err != nil {
			t.Fatal(err)
		}
		t.Logf("fork %d: %v", i, time.Since(began).Round(time.Millisecond))
		past("fork "+strconv.Itoa(i), 3)
		if err := mgr.Remove(ctx, child); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := mgr.Hibernate(ctx, "lk"); err != nil {
		t.Fatal(err)
	}
	if _, err := mgr.Resume(ctx, "lk"); err != nil {
		t.Fatal(err)
	}
	past("the hibernation", 5)
	if c2, err := mgr.Client(ctx, "lk"); err != nil || c2 != c {
		t.Errorf("after the hibernation the box has client %p (%v), want the one it had, %p", c2, err, c)
		logConsole(t, mgr, "lk")
	}
	t.Logf("the counter reached %d over %d forks and a hibernation", last, forks)
}

// randomFile returns n bytes of no pattern.
func randomFile(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(5, 6))
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b
}

// putFile writes data to path in the box over sftp.
func putFile(c *ssh.Client, path string, data []byte) error {
	sc, err := sftp.NewClient(c)
	if err != nil {
		return err
	}
	defer sc.Close()
	f, err := sc.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.ReadFrom(bytes.NewReader(data)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// readCounter sends the numbers of "n N" lines read from r.
func readCounter(t *testing.T, r io.Reader, lines chan<- int) {
	defer close(lines)
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		f := strings.Fields(line)
		if len(f) != 2 || f[0] != "n" {
			t.Errorf("the counter printed %q", line)
			continue
		}
		n, err := strconv.Atoi(f[1])
		if err != nil {
			t.Errorf("the counter printed %q", line)
			continue
		}
		lines <- n
	}
}

// logConsole logs the last lines of box name's console.
func logConsole(t *testing.T, mgr *box.Manager, name string) {
	t.Helper()
	path, err := mgr.ConsolePath(name)
	if err != nil {
		t.Logf("console of %s: %v", name, err)
		return
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Logf("console of %s: %v", name, err)
		return
	}
	b = b[max(0, len(b)-4096):]
	t.Logf("the end of %s's console:\n%s", name, b)
}
