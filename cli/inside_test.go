package cli_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/box/boxtest"
)

// insideScript runs in box dev: it forks the box three ways; each child
// computes a different number and writes it; the parent waits for them,
// reads each result with box cp, keeps the best child and removes the
// others. Child 1 also tries to remove its parent; the parent tries an
// unrelated box and a fork past its limit.
const insideScript = `
set -u
case $(box fork --count 3) in
child*)
	exec >/root/child.log 2>&1
	. /run/box/fork
	box rm "$BOX_PARENT"; echo $? > /root/rm-parent
	echo $((BOX_FORK_INDEX * 7 % 5)) > /root/result.tmp && mv /root/result.tmp /root/result
	exit 0 ;;
parent*) ;;
*) echo "box fork printed nothing"; exit 1 ;;
esac
kids=$(box ls --json | tr '{' '\n' | sed -n 's/.*"name":"\([^"]*\)".*"relation":"fork".*/\1/p')
echo "forks: $(echo $kids)"
box fork >/dev/null 2>/tmp/limit; echo "fork past the limit: $? $(cat /tmp/limit)"
box exec other -- true 2>/tmp/other; echo "exec in other: $? $(cat /tmp/other)"
best= bestv=-1
for k in $kids; do
	until box exec "$k" -- test -f /root/result; do sleep 0.2; done
	box cp "$k:/root/result" /tmp/r
	v=$(cat /tmp/r)
	echo "$k: $v"
	if [ "$v" -gt "$bestv" ]; then best=$k bestv=$v; fi
done
box cp dev-1:/root/rm-parent /tmp/rm-parent
echo "child removing its parent: $(cat /tmp/rm-parent)"
for k in $kids; do [ "$k" = "$best" ] || box rm "$k" >/dev/null; done
echo "best: $best $bestv"
`

// TestInsideForkQEMU runs insideScript in a real box under QEMU, through
// boxd exec: box fork returns in the parent and in each child, and what is
// left on the host is the parent, the best child and the unrelated box.
func TestInsideForkQEMU(t *testing.T) {
	root := shortRoot(t)
	boxtest.PrepareRoot(t, root)
	d := startDaemon(t, root)
	t.Cleanup(func() {
		for _, n := range boxNames(t, root) {
			run(t, root, "rm", n)
		}
		_ = d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait()
	})
	ok(t, root, "create", "dev", "--image", boxtest.Image, "--memory", "256M", "--runner", "qemu", "--max-forks", "3")
	ok(t, root, "create", "other", "--image", boxtest.Image, "--memory", "128M", "--runner", "qemu", "--allow-fork-from-inside=false")

	r := run(t, root, "exec", "dev", "--", "sh", "-c", insideScript)
	if r.code != 0 {
		t.Fatalf("the script in dev: %v", r)
	}
	out := r.stdout
	for _, want := range []string{
		"forks: dev-1 dev-2 dev-3",
		"fork past the limit: 7 box: box dev cannot fork 1 more",
		"exec in other: 3 ",
		"dev-1: 2", "dev-2: 4", "dev-3: 1",
		"child removing its parent: 10",
		"best: dev-2 4",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("the script's output lacks %q:\n%s", want, out)
		}
	}
	if got := strings.Join(boxNames(t, root), " "); got != "dev dev-2 other" {
		t.Errorf("boxes left: %s, want dev dev-2 other", got)
	}
	// The child that was kept knows which it is, for programs started
	// after the fork.
	if got := ok(t, root, "exec", "dev-2", "--", "cat", "/run/box/fork").stdout; !strings.Contains(got, "BOX_FORK_INDEX=2\nBOX_FORK_COUNT=3\nBOX_PARENT=dev\nBOX_NAME=dev-2\n") {
		t.Errorf("/run/box/fork in dev-2: %q", got)
	}
	// box hibernate answers, then hibernates the box it runs in; a use
	// resumes it.
	if got := ok(t, root, "exec", "dev-2", "--", "box", "hibernate").stdout; !strings.Contains(got, "hibernating") {
		t.Errorf("box hibernate said %q", got)
	}
	waitState(t, root, "dev-2", "hibernated")
	if got := ok(t, root, "exec", "dev-2", "--", "cat", "/root/result").stdout; got != "4\n" {
		t.Errorf("dev-2's result after hibernation: %q", got)
	}
	// A box created without the allowance may not ask at all.
	r = run(t, root, "exec", "other", "--", "box", "ls")
	if r.code != 10 || !strings.Contains(r.stderr, "may not ask boxd") {
		t.Errorf("box ls in other: %v", r)
	}
}

// waitState waits until box name is in state.
func waitState(t *testing.T, root, name, state string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		var bx struct{ State string }
		r := ok(t, root, "ls", "--json")
		var boxes []struct{ Name, State string }
		decodeJSON(t, r.stdout, &boxes)
		for _, b := range boxes {
			if b.Name == name {
				bx.State = b.State
			}
		}
		if bx.State == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("box %s is %s, want %s", name, bx.State, state)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
