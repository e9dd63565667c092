package qemu_test

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/guestkernel"
	"github.com/boxd-dev/boxd/internal/initramfs"
	"github.com/boxd-dev/boxd/internal/testutil"
	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/boxd-dev/boxd/runner/runnertest"
	"github.com/boxd-dev/boxd/snapshotter"
)

// observerInit is the conformance guest: it loads the virtio console
// driver and prints "step N sum S L" every 200 ms, where S is the MD5 (and
// L the length) of a file in RAM that grows each step by the step's
// number. It adds every line the host writes on the agent port to that
// file (the host's fresh entropy after a unique restore, seedGuest) and
// answers it with "seeded " and the line. What the guest prints thus
// depends only on its own steps and on the lines the host sent: machines
// that go on from one snapshot take the same steps unless the host seeds
// them.
//
// The port is found by its name: its device is vportNp1, N the index of
// the virtio device, which is not 0 where a virtio disk comes first. The
// reader opens it once: a port's unread data is dropped when it is
// closed, and a read while no host is connected ends at once (EOF).
const observerInit = `#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/boxd/order); do insmod /lib/modules/boxd/$m; done
: > /tmp/state
(
	port=
	while [ -z "$port" ] || [ ! -c "$port" ]; do
		for p in /sys/class/virtio-ports/*; do
			[ "$(cat $p/name 2>/dev/null)" = ` + qemu.AgentPort + ` ] && port=/dev/${p##*/}
		done
		sleep 0.05
	done
	exec 3<>$port
	while :; do
		if read -r line <&3; then
			echo "$line" >> /tmp/state
			echo "seeded $line" >&3
		else
			sleep 0.05
		fi
	done
) &
i=0
while :; do
	echo "step $i sum $(md5sum < /tmp/state | head -c 16) $(wc -c < /tmp/state)"
	echo "$i" >> /tmp/state
	i=$((i+1))
	sleep 0.2
done
`

var stepRE = regexp.MustCompile(`(?m)^step (\d+) sum ([0-9a-f]{16}) +(\d+)\r?\n`)

// observer reads the conformance guest's steps from the console.
type observer struct {
	mu   sync.Mutex
	seen map[runner.Machine]int // console bytes already observed
}

func (o *observer) Next(ctx context.Context, rm runner.Machine) (runner.Observation, error) {
	m := rm.(*qemu.Machine)
	o.mu.Lock()
	from := o.seen[rm]
	o.mu.Unlock()
	st, err := m.Status(ctx)
	if err != nil {
		return runner.Observation{}, err
	}
	if st != "running" {
		// Nothing is printed while paused: the next step is after here.
		from = len(m.Console())
		if err := m.Continue(ctx); err != nil {
			return runner.Observation{}, err
		}
	}
	for {
		c := m.Console()
		if from < len(c) {
			if loc := stepRE.FindSubmatchIndex(c[from:]); loc != nil {
				sub := c[from:]
				n, _ := strconv.ParseUint(string(sub[loc[2]:loc[3]]), 10, 64)
				sum, _ := strconv.ParseUint(string(sub[loc[4]:loc[5]]), 16, 64)
				size, _ := strconv.ParseUint(string(sub[loc[6]:loc[7]]), 10, 64)
				o.mu.Lock()
				o.seen[rm] = from + loc[1]
				o.mu.Unlock()
				return runner.Observation{Counter: n, Checksum: sum ^ size}, nil
			}
		}
		select {
		case <-ctx.Done():
			return runner.Observation{}, fmt.Errorf("no step on the console: %w; console:\n%s", ctx.Err(), c)
		case <-m.Done():
			return runner.Observation{}, fmt.Errorf("machine exited: %w; console:\n%s", m.Err(), c)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// seedGuest is the conformance guest's reseed: a line of fresh host
// entropy on the agent port. It returns once the guest has added the line
// to its state and said so, as the agent answers its Unique request: the
// guest's next step already depends on it.
func seedGuest(ctx context.Context, m *qemu.Machine) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", m.AgentSocket())
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	line := "seed " + hex.EncodeToString(seed)
	if _, err := fmt.Fprintln(conn, line); err != nil {
		return err
	}
	// The guest may answer lines it took before (from an earlier
	// connection): only the answer to this one will do.
	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		if sc.Text() == "seeded "+line {
			return nil
		}
	}
	// Say what became of the guest: the console shows a kernel's crash.
	err = cmp.Or(ctx.Err(), sc.Err(), io.ErrUnexpectedEOF)
	select {
	case <-m.Done():
		return fmt.Errorf("the guest did not take its seed: %w; QEMU exited: %w; console:\n%s", err, m.Err(), m.Console())
	case <-time.After(time.Second):
	}
	return fmt.Errorf("the guest did not take its seed: %w; console:\n%s", err, m.Console())
}

func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Linux guests under QEMU; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	kernel, initrd := observerGuest(ctx, t)
	runnertest.Suite(t, runnertest.Backend{
		New: func(t *testing.T) (runner.Runner, *snapshotter.Graph) {
			g := testutil.OpenGraph(t, t.TempDir(), snapshotter.Open)
			r := &qemu.Runner{Dir: t.TempDir(), MemDir: shmDir(t), Graph: g, Unique: seedGuest}
			t.Cleanup(func() {
				// The machines have stopped; snapshots still being
				// written keep their files until they are in the store.
				if err := r.Flush(context.Background()); err != nil {
					t.Errorf("Flush: %v", err)
				}
				if left := r.FrozenFiles(); len(left) != 0 {
					t.Errorf("frozen memory files left behind: %v", left)
				}
			})
			return r, g
		},
		Spec: runner.Spec{
			MemSize: 128 << 20,
			Kernel:  kernel,
			Initrd:  initrd,
			Cmdline: "console=ttyS0 panic=-1 quiet",
			Network: runner.NetworkNone,
		},
		Observer: &observer{seen: map[runner.Machine]int{}},
		Successor: func(t *testing.T, r runner.Runner, m runner.Machine) runner.Runner {
			qr := r.(*qemu.Runner)
			qemu.DropQMP(m.(*qemu.Machine))
			return &qemu.Runner{Dir: qr.Dir, MemDir: qr.MemDir, Graph: qr.Graph, Unique: seedGuest}
		},
	})
}

// shmDir is a fresh folder on tmpfs for memory files.
func shmDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/dev/shm", "boxd-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// observerGuest writes the conformance guest's initramfs: busybox, the
// virtio console modules and observerInit.
func observerGuest(ctx context.Context, t *testing.T) (kernel, initrd string) {
	t.Helper()
	return busyboxGuest(ctx, t, observerInit, "virtio_pci", "virtio_console", "virtio_blk")
}

// busyboxGuest fetches the kernel and writes an initramfs of static
// busybox, the modules named (and what they need, listed in load order in
// /lib/modules/boxd/order) and init as /init; it returns their paths.
func busyboxGuest(ctx context.Context, t testing.TB, init string, modules ...string) (kernel, initrd string) {
	t.Helper()
	testutil.EnsurePackages(ctx, t, map[string]string{"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"})
	testutil.StaticBusybox(ctx, t)
	cache, err := guestkernel.DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	k, err := guestkernel.Fetch(ctx, cache)
	if err != nil {
		t.Fatalf("cannot fetch the guest kernel: %v", err)
	}
	var order []initramfs.Module
	if len(modules) > 0 {
		mods, err := initramfs.ScanModules(k.ModulesDir)
		if err != nil {
			t.Fatal(err)
		}
		if order, err = mods.LoadOrder(modules...); err != nil {
			t.Fatal(err)
		}
	}
	initrd = filepath.Join(t.TempDir(), "initrd.gz")
	f, err := os.Create(initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := initramfs.NewGzipWriter(f)
	check := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"/bin", "/dev", "/proc", "/sys", "/tmp", "/lib/modules/boxd"} {
		check(w.Dir(d, 0o755))
	}
	check(w.CharDev("/dev/console", 0o600, 5, 1))
	check(w.CopyFile("/bin/busybox", 0o755, busyboxPath))
	for _, applet := range []string{"sh", "mount", "sleep", "echo", "cat", "md5sum", "wc", "head", "insmod", "dd", "mkdir", "rm", "sync"} {
		check(w.Symlink("/bin/"+applet, "busybox"))
	}
	var list string
	for _, m := range order {
		name := filepath.Base(m.Path)
		check(w.CopyFile("/lib/modules/boxd/"+name, 0o644, m.Path))
		list += name + "\n"
	}
	check(w.File("/lib/modules/boxd/order", 0o644, []byte(list)))
	check(w.File("/init", 0o755, []byte(init)))
	check(w.Close())
	check(f.Close())
	return k.Vmlinuz, initrd
}
