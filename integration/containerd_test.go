// Package integration holds boxd's end-to-end tests: they run the boxd
// binary with real outside programs, as root.
//
// TestContainerd runs containers with Debian's containerd 1.6 and runc on
// boxd's snapshotter (`boxd snapshotter`, a proxy plugin), from images it
// builds itself, and checks in boxd's dedup report that what the images
// share is stored once. The first run builds a Debian root filesystem with
// debootstrap (a few minutes, network needed) and caches it under
// /var/cache/boxd-test (BOXD_TEST_CACHE); BOXD_BIN names a boxd binary to use
// instead of building bin/boxd. It is skipped with -short and when not root.
package integration

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/boxd-dev/boxd/internal/mountinfo"
	"github.com/boxd-dev/boxd/snapshotter"
	ctdsnap "github.com/boxd-dev/boxd/snapshotter/containerd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
)

const (
	// ctrNamespace is containerd's namespace for everything the test makes.
	ctrNamespace = "boxd"
	// snapshotterName is boxd's proxy plugin in containerd's config.
	snapshotterName = "boxd"
)

// image is an image the test built, as an OCI layout tar.
type image struct {
	ref    string // the full name ctr gives it
	tar    string
	layers []layer
}

// chainIDs are the names containerd gives the committed snapshots of the
// image's layers, bottom first.
func (im image) chainIDs() []digest.Digest {
	var diffIDs []digest.Digest
	for _, l := range im.layers {
		diffIDs = append(diffIDs, l.diffID)
	}
	return identity.ChainIDs(diffIDs)
}

// baseName is the ref without its tag: ctr images import's --base-name.
func (im image) baseName() string { return im.ref[:strings.LastIndex(im.ref, ":")] }

// daemons is the running boxd snapshotter and containerd.
type daemons struct {
	t          *testing.T
	dir        string
	boxdRoot   string
	boxdSock   string
	ctrSock    string
	snap, ctrd *proc
	containers []string
	// ns is the containerd namespace the test works in ("" for
	// ctrNamespace); cri, when set, enables containerd's CRI with this
	// configuration of its plugin's.
	ns, cri string
	// bin is the folder of the containerd and ctr to run, "" for the
	// system's (Debian's containerd 1.6).
	bin string
}

// tool is the path of containerd's program name (containerd, ctr) the
// test runs.
func (d *daemons) tool(name string) string {
	if d.bin != "" {
		return filepath.Join(d.bin, name)
	}
	return name
}

// ctrArgs are ctr's arguments for the test's containerd and namespace,
// then args.
func (d *daemons) ctrArgs(args ...string) []string {
	return append([]string{"--address", d.ctrSock, "--namespace", d.namespace()}, args...)
}

// namespace is the containerd namespace the test works in.
func (d *daemons) namespace() string {
	if d.ns != "" {
		return d.ns
	}
	return ctrNamespace
}

func TestContainerd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test with containerd and runc: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: it runs containerd and runc and mounts loop devices")
	}
	began := time.Now()
	step := func(what string, since time.Time) { t.Logf("%-44s %6.1fs", what, time.Since(since).Seconds()) }

	t0 := time.Now()
	ensurePackages(t, "containerd", "runc", "debootstrap", "busybox-static", "e2fsprogs")
	step("packages", t0)

	tmp := t.TempDir()
	// Cleanups run last in, first out: this one, registered before any
	// daemon starts, runs after every daemon is stopped and before the
	// folder is removed.
	t.Cleanup(func() {
		mounts, loops, err := unmountAll(tmp)
		if len(mounts)+len(loops) > 0 || err != nil {
			t.Logf("cleanup: unmounted %v, detached %v, %v", mounts, loops, err)
		}
	})

	t0 = time.Now()
	boxd := boxdBinary(t)
	step("boxd binary", t0)

	t0 = time.Now()
	rootfs := debootstrapRootfs(t)
	step("Debian root filesystem", t0)

	t0 = time.Now()
	busybox, debian, extra, dcopy := buildImages(t, filepath.Join(tmp, "images"), rootfs)
	step("image tarballs", t0)

	d := &daemons{
		t:        t,
		dir:      tmp,
		boxdRoot: filepath.Join(tmp, "root"),
		boxdSock: filepath.Join(tmp, "boxd.sock"),
		ctrSock:  filepath.Join(tmp, "containerd.sock"),
	}
	t0 = time.Now()
	d.startSnapshotter(boxd)
	d.startContainerd()
	step("boxd snapshotter and containerd up", t0)

	// The images, each unpacked into boxd's snapshotter by the import.
	for _, im := range []image{busybox, debian, extra, dcopy} {
		t0 = time.Now()
		d.importImage(im)
		step("import "+im.ref, t0)
	}

	osVersion := readRootfsFile(t, rootfs, "etc/debian_version")
	runs := []struct {
		im         image
		what, want string
		args       []string
	}{
		{busybox, "echo", "hello-from-boxd", []string{"echo", "hello-from-boxd"}},
		{debian, "cat", osVersion, []string{"cat", "/etc/debian_version"}},
		{debian, "write", "ok", []string{"sh", "-c", "echo ok > /tmp/x && cat /tmp/x"}},
		// Each container has its own writable snapshot: the last one's
		// file is not in the next.
		{debian, "fresh", "fresh", []string{"sh", "-c", "test ! -e /tmp/x && echo fresh"}},
		// The extra layer's file is there, the file it whites out is not,
		// and the base below is the same.
		{extra, "layers", "boxd extra layer\nissue.net removed\n" + osVersion,
			[]string{"sh", "-c", "cat /etc/boxd-extra && test ! -e /etc/issue.net && echo issue.net removed && cat /etc/debian_version"}},
		{dcopy, "cat", "boxd copy\n" + osVersion, []string{"cat", "/etc/boxd-copy", "/etc/debian_version"}},
	}
	for i, r := range runs {
		t0 = time.Now()
		id := fmt.Sprintf("boxd-test-%d-%d", os.Getpid(), i)
		got := d.run(r.im, id, r.args...)
		if got != r.want {
			t.Errorf("%s in %s: output %q, want %q", strings.Join(r.args, " "), r.im.ref, got, r.want)
		}
		step(fmt.Sprintf("run %s (%s)", r.im.ref, r.what), t0)
	}

	// `ctr run --rm` removes each container's snapshot from containerd's
	// records at once; containerd's garbage collector then removes it from
	// boxd, whose image file for it must go.
	t0 = time.Now()
	want := map[string]bool{}
	for _, im := range []image{busybox, debian, extra, dcopy} {
		for _, c := range im.chainIDs() {
			want[c.String()] = true
		}
	}
	d.waitSnapshots(want, time.Minute)
	d.waitNoImages(time.Minute)
	step("containers' snapshots collected", t0)

	t0 = time.Now()
	d.stop()
	step("daemons stopped", t0)

	t0 = time.Now()
	checkStore(t, boxd, d.boxdRoot, busybox, debian, extra, dcopy)
	step("store report and verify", t0)

	// Both daemons again on the same folders: boxd's records and snapshots
	// outlive a restart, and a container runs on the images as unpacked.
	t0 = time.Now()
	d.startSnapshotter(boxd)
	d.startContainerd()
	if got := d.snapshots(); len(got) != len(want) {
		t.Errorf("after a restart containerd lists boxd's snapshots %v, want the %d layers'", got, len(want))
	}
	id := fmt.Sprintf("boxd-test-%d-restart", os.Getpid())
	if got, w := d.run(extra, id, "cat", "/etc/boxd-extra"), "boxd extra layer"; got != w {
		t.Errorf("after a restart, cat /etc/boxd-extra in %s: output %q, want %q", extra.ref, got, w)
	}
	// Removing an image removes its layer's snapshot from boxd (containerd's
	// garbage collector calls Remove, then Cleanup, which collects the
	// store's garbage); the other images keep theirs.
	d.ctr(time.Minute, "images", "rm", "--sync", dcopy.ref)
	delete(want, dcopy.chainIDs()[0].String())
	d.waitSnapshots(want, time.Minute)
	d.waitNoImages(time.Minute)
	d.stop()
	step("restart, run, remove an image, stop", t0)

	t0 = time.Now()
	var list []snapshotter.Snapshot
	boxdJSON(t, boxd, d.boxdRoot, &list, "store", "ls")
	if len(list) != len(want) {
		t.Errorf("after removing %s boxd's store has %d graph snapshots, want %d: %+v", dcopy.ref, len(list), len(want), list)
	}
	verifyStore(t, boxd, d.boxdRoot)
	var report snapshotter.Report
	boxdJSON(t, boxd, d.boxdRoot, &report, "store", "report")
	t.Logf("report after removing %s: %d snapshots, unique %.1f MiB, packs %.1f MiB, garbage %.1f MiB in %d chunks",
		dcopy.ref, report.Snapshots, mib(report.UniqueBytes), mib(report.Store.PackBytes), mib(report.Store.GarbageBytes), report.Store.GarbageChunks)
	step("store ls, verify, report", t0)
	t.Logf("total %.1fs", time.Since(began).Seconds())
}

// buildImages writes the four test images under dir:
//   - busybox: the host's static busybox, one gzip layer;
//   - debian: the Debian root filesystem, one gzip layer (the base);
//   - extra: the base layer and a small layer that adds /etc/boxd-extra
//     and whites out /etc/issue.net;
//   - copy: the same Debian files with /etc/boxd-copy, as one uncompressed
//     layer. Its layer is not the base's, so containerd unpacks it into a
//     fresh snapshot with no parent: only boxd's chunk-level dedup can
//     share its blocks with the base's.
func buildImages(t *testing.T, dir, rootfs string) (busybox, debian, extra, dcopy image) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	base, err := writeLayer(filepath.Join(dir, "debian-base.layer"), true, func(tw *tar.Writer) error { return tarTree(tw, rootfs) })
	if err != nil {
		t.Fatalf("Debian base layer: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(rootfs, "etc", "issue.net")); err != nil {
		t.Fatalf("the extra layer whites out /etc/issue.net: %v", err)
	}
	top, err := writeLayer(filepath.Join(dir, "extra.layer"), true, func(tw *tar.Writer) error {
		if err := tarFile(tw, "etc/", 0o755, tar.TypeDir, nil, ""); err != nil {
			return err
		}
		if err := tarFile(tw, "etc/boxd-extra", 0o644, tar.TypeReg, []byte("boxd extra layer\n"), ""); err != nil {
			return err
		}
		return tarFile(tw, "etc/.wh.issue.net", 0o644, tar.TypeReg, nil, "")
	})
	if err != nil {
		t.Fatalf("extra layer: %v", err)
	}
	cp, err := writeLayer(filepath.Join(dir, "debian-copy.layer"), false, func(tw *tar.Writer) error {
		if err := tarTree(tw, rootfs); err != nil {
			return err
		}
		return tarFile(tw, "etc/boxd-copy", 0o644, tar.TypeReg, []byte("boxd copy\n"), "")
	})
	if err != nil {
		t.Fatalf("Debian copy layer: %v", err)
	}
	busybox = busyboxImage(t, dir)
	t.Logf("layers: busybox %s, Debian base %s (%d MB gzip), extra %s, copy %s (%d MB)",
		busybox.layers[0].diffID.Encoded()[:12], base.diffID.Encoded()[:12], base.size>>20, top.diffID.Encoded()[:12], cp.diffID.Encoded()[:12], cp.size>>20)
	return busybox, makeImage(t, dir, "debian", base), makeImage(t, dir, "debian-extra", base, top), makeImage(t, dir, "debian-copy", cp)
}

// busyboxImage writes the busybox image under dir: the host's static
// busybox, one gzip layer.
func busyboxImage(t *testing.T, dir string) image {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bb, err := busyboxLayer(filepath.Join(dir, "busybox.layer"), "/bin/busybox")
	if err != nil {
		t.Fatalf("busybox layer: %v", err)
	}
	return makeImage(t, dir, "busybox", bb)
}

// makeImage writes image docker.io/boxd/NAME:test of layers under dir.
func makeImage(t *testing.T, dir, name string, layers ...layer) image {
	t.Helper()
	im := image{ref: "docker.io/boxd/" + name + ":test", tar: filepath.Join(dir, name+".tar"), layers: layers}
	if _, err := writeImage(im.tar, im.ref, layers); err != nil {
		t.Fatalf("image %s: %v", im.ref, err)
	}
	return im
}

// startSnapshotter starts `boxd snapshotter` and waits for its socket.
func (d *daemons) startSnapshotter(boxd string) {
	t := d.t
	t.Helper()
	d.snap = startProc(t, "boxd snapshotter", filepath.Join(d.dir, "boxd-snapshotter.log"), boxd,
		"snapshotter", "--root", d.boxdRoot, "--address", d.boxdSock)
	waitSocket(t, d.snap, d.boxdSock, 30*time.Second)
}

// startContainerd starts containerd with a private config (its root, state
// and sockets in the test's folder; boxd's snapshotter as a proxy plugin)
// and waits until ctr gets an answer.
func (d *daemons) startContainerd() {
	t := d.t
	t.Helper()
	disabled := `disabled_plugins = ["io.containerd.grpc.v1.cri"]`
	if d.cri != "" {
		disabled = ""
	}
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
%s

[grpc]
  address = %q

[ttrpc]
  address = %q

[proxy_plugins.%s]
  type = "snapshot"
  address = %q
`, filepath.Join(d.dir, "containerd", "root"), filepath.Join(d.dir, "containerd", "state"), disabled,
		d.ctrSock, d.ctrSock+".ttrpc", snapshotterName, d.boxdSock) + d.cri
	cfgPath := filepath.Join(d.dir, "containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// After containerd stops (the cleanup below runs first), kill the shims
	// it started: a shim outlives a containerd that is killed.
	t.Cleanup(func() {
		if pids := killShims(d.ctrSock); len(pids) > 0 {
			t.Logf("cleanup: killed containerd shims %v", pids)
		}
	})
	d.ctrd = startProc(t, "containerd", filepath.Join(d.dir, "containerd.log"), d.tool("containerd"), "--config", cfgPath)
	// Before containerd stops, remove what is left of the containers (only
	// when the test failed half-way).
	t.Cleanup(d.removeContainers)

	deadline := time.Now().Add(time.Minute)
	for {
		if d.ctrd.exited() {
			t.Fatalf("containerd exited (%v):\n%s", d.ctrd.err, d.ctrd.tail(30))
		}
		_, err := run(context.Background(), 10*time.Second, d.tool("ctr"), "--address", d.ctrSock, "version")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd does not answer: %v\n%s", err, d.ctrd.tail(30))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// containerd loaded boxd's plugin.
	out := d.ctr(30*time.Second, "plugins", "ls")
	ok := false
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[0] == "io.containerd.snapshotter.v1" && f[1] == snapshotterName {
			ok = f[len(f)-1] == "ok"
		}
	}
	if !ok {
		t.Fatalf("containerd has no working snapshotter %q:\n%s", snapshotterName, out)
	}
}

// ctr runs ctr against the test's containerd, in the test's namespace, and
// returns its output; a failure fails the test.
func (d *daemons) ctr(timeout time.Duration, args ...string) string {
	d.t.Helper()
	out, err := run(context.Background(), timeout, d.tool("ctr"), d.ctrArgs(args...)...)
	if err != nil {
		d.t.Fatalf("%v\nstdout:\n%s", err, tail(out, 20))
	}
	return out
}

// importImage imports an image's tarball, unpacking it with boxd's
// snapshotter, and checks that boxd holds each layer's committed snapshot.
func (d *daemons) importImage(im image) {
	t := d.t
	t.Helper()
	args := []string{"images", "import", "--base-name", im.baseName(), "--snapshotter", snapshotterName, im.tar}
	if d.bin != "" {
		// containerd 2.x's transfer service unpacks only for platforms
		// its config lists: ctr imports by itself instead.
		args = slices.Insert(args, 2, "--local")
	}
	d.ctr(10*time.Minute, args...)
	if out := d.ctr(30*time.Second, "images", "ls", "-q"); !strings.Contains("\n"+out, "\n"+im.ref+"\n") {
		t.Fatalf("after importing %s, containerd's images are:\n%s", im.ref, out)
	}
	// The import unpacked the layers with boxd: `ctr run` would unpack
	// them itself otherwise, and this would not have been tested.
	snaps := d.snapshots()
	for _, c := range im.chainIDs() {
		if kind := snaps[c.String()]; kind != "Committed" {
			t.Fatalf("importing %s did not unpack layer %s into snapshotter %s (kind %q); its snapshots: %v", im.ref, c, snapshotterName, kind, snaps)
		}
	}
}

// snapshots returns boxd's snapshots as containerd lists them: key → kind.
func (d *daemons) snapshots() map[string]string {
	out := d.ctr(30*time.Second, "snapshots", "--snapshotter", snapshotterName, "ls")
	snaps := map[string]string{}
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 2 {
			continue // the header
		}
		snaps[f[0]] = f[len(f)-1]
	}
	return snaps
}

// waitSnapshots waits until boxd's snapshots are exactly want.
func (d *daemons) waitSnapshots(want map[string]bool, timeout time.Duration) {
	t := d.t
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := d.snapshots()
		extra := []string{}
		for k, kind := range got {
			if !want[k] {
				extra = append(extra, k+" ("+kind+")")
			}
		}
		missing := []string{}
		for k := range want {
			if _, ok := got[k]; !ok {
				missing = append(missing, k)
			}
		}
		if len(missing) > 0 {
			t.Fatalf("boxd lost committed snapshots %v; it has %v", missing, got)
		}
		if len(extra) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after the containers were removed, boxd still has their snapshots %v", timeout, extra)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitNoImages waits until boxd's snapshotter holds no image file: every
// active snapshot and view was removed from it (committed snapshots have
// none).
func (d *daemons) waitNoImages(timeout time.Duration) {
	t := d.t
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left, err := filepath.Glob(filepath.Join(d.boxdRoot, "containerd", "images", "*"))
		if err != nil {
			t.Fatal(err)
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after every container was removed, boxd still has image files %v", timeout, left)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// run runs a container of im with runc, on a snapshot of boxd's, and
// returns its output, trimmed.
func (d *daemons) run(im image, id string, args ...string) string {
	d.t.Helper()
	d.containers = append(d.containers, id)
	// ctr 1.6 can cut the output of a task that exits at once short (it
	// stops copying the fifo when the task is deleted): the command lingers
	// a moment after its output, keeping its status.
	args = append([]string{"sh", "-c", `"$@"; s=$?; sleep 0.2; exit $s`, "sh"}, args...)
	out := d.ctr(5*time.Minute, append([]string{"run", "--snapshotter", snapshotterName, "--rm", im.ref, id}, args...)...)
	return strings.TrimSpace(strings.ReplaceAll(out, "\r\n", "\n"))
}

// removeContainers kills and removes the test's containers that still
// exist (only after a failure); containerd must be up.
func (d *daemons) removeContainers() {
	if d.ctrd == nil || d.ctrd.exited() || len(d.containers) == 0 {
		return
	}
	ctr := func(args ...string) (string, error) {
		return run(context.Background(), 30*time.Second, d.tool("ctr"), d.ctrArgs(args...)...)
	}
	out, err := ctr("containers", "ls", "-q")
	if err != nil {
		d.t.Logf("cleanup: %v", err)
		return
	}
	for id := range strings.FieldsSeq(out) {
		if !strings.HasPrefix(id, fmt.Sprintf("boxd-test-%d-", os.Getpid())) {
			continue
		}
		_, _ = ctr("tasks", "kill", "--all", "--signal", "SIGKILL", id)
		_, _ = ctr("tasks", "delete", "--force", id)
		if _, err := ctr("containers", "delete", id); err != nil {
			d.t.Logf("cleanup: %v", err)
		} else {
			d.t.Logf("cleanup: removed container %s", id)
		}
	}
}

// stop stops containerd, then boxd's snapshotter, which must exit cleanly,
// and checks that nothing is left mounted under the test's folder.
func (d *daemons) stop() {
	t := d.t
	t.Helper()
	if err := d.ctrd.stop(30 * time.Second); err != nil {
		t.Logf("containerd: %v", err)
	}
	if pids := killShims(d.ctrSock); len(pids) > 0 {
		t.Errorf("containerd shims %v were still running after every container was removed and containerd stopped", pids)
	}
	if err := d.snap.stop(time.Minute); err != nil {
		t.Errorf("boxd snapshotter did not exit cleanly: %v\n%s", err, d.snap.tail(30))
	}
	if mps, _ := mountinfo.Under(d.dir); len(mps) > 0 {
		t.Errorf("still mounted after containerd and boxd stopped: %v", mps)
	}
	if loops, _ := mountinfo.LoopsUnder(d.dir); len(loops) > 0 {
		t.Errorf("loop devices still attached after containerd and boxd stopped: %v", loops)
	}
}

// boxdJSON runs `boxd --root root ARGS --json` and decodes its output.
func boxdJSON(t *testing.T, boxd, root string, v any, args ...string) {
	t.Helper()
	out, err := run(context.Background(), 5*time.Minute, boxd, append(append([]string{"--root", root}, args...), "--json")...)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("boxd %s --json: %v\n%s", strings.Join(args, " "), err, tail(out, 20))
	}
}

// verifyStore runs `boxd store verify`: every chunk re-hashed, every
// snapshot's chunks present.
func verifyStore(t *testing.T, boxd, root string) {
	t.Helper()
	var verify struct {
		Damaged  []json.RawMessage `json:"damaged"`
		Problems []json.RawMessage `json:"problems"`
	}
	boxdJSON(t, boxd, root, &verify, "store", "verify")
	if len(verify.Damaged)+len(verify.Problems) > 0 {
		t.Errorf("boxd store verify: damaged %s, problems %s", verify.Damaged, verify.Problems)
	}
}

// checkStore reads boxd's store once the daemons are stopped: its snapshots,
// its dedup report and a verify.
func checkStore(t *testing.T, boxd, root string, busybox, debian, extra, dcopy image) {
	t.Helper()
	var list []snapshotter.Snapshot
	boxdJSON(t, boxd, root, &list, "store", "ls")
	var report snapshotter.Report
	boxdJSON(t, boxd, root, &report, "store", "report")
	verifyStore(t, boxd, root)

	// containerd names a committed layer snapshot by its chain id, and
	// hands the snapshotter that name as <namespace>/<n>/<chain id>; boxd
	// keeps it in a label of the graph snapshot (ctd-<id>).
	byChain := map[string][]snapshotter.Snapshot{}
	for _, s := range list {
		name := s.Labels[ctdsnap.LabelName]
		name = name[strings.LastIndex(name, "/")+1:]
		byChain[name] = append(byChain[name], s)
	}
	rows := map[string]snapshotter.SnapshotReport{}
	for _, r := range report.PerSnap {
		rows[r.Name] = r
	}
	one := func(what string, chain digest.Digest) snapshotter.SnapshotReport {
		t.Helper()
		ss := byChain[chain.String()]
		if len(ss) != 1 {
			t.Fatalf("%s (%s): %d graph snapshots in boxd's store, want exactly 1: %+v", what, chain, len(ss), ss)
		}
		r, ok := rows[ss[0].Name]
		if !ok {
			t.Fatalf("%s: snapshot %s is not in the report", what, ss[0].Name)
		}
		return r
	}
	bb := one("busybox layer", busybox.chainIDs()[0])
	base := one("Debian base layer", debian.chainIDs()[0])
	if got := extra.chainIDs()[0]; got != debian.chainIDs()[0] {
		t.Fatalf("the extra image's base chain id %s is not the Debian image's %s", got, debian.chainIDs()[0])
	}
	top := one("extra layer", extra.chainIDs()[1])
	cp := one("Debian copy layer", dcopy.chainIDs()[0])
	if len(list) != 4 {
		t.Errorf("boxd's store has %d graph snapshots, want 4 (busybox, base, extra, copy): %+v", len(list), list)
	}

	t.Logf("report: %d snapshots, referenced %d MiB, unique %d MiB, stored %d MiB (dedup %.2f, compression %.2f)",
		report.Snapshots, report.ReferencedBytes>>20, report.UniqueBytes>>20, report.StoredBytes>>20, report.DedupRatio, report.CompressionRatio)
	for _, r := range []struct {
		what string
		row  snapshotter.SnapshotReport
	}{{"busybox", bb}, {"Debian base", base}, {"extra", top}, {"Debian copy", cp}} {
		t.Logf("  %-12s %-8s parent %-8s referenced %7.1f MiB  new %7.1f MiB  reused %7.1f MiB  written %7.1f MiB  exclusive %7.1f MiB",
			r.what, r.row.Name, r.row.Parent, mib(r.row.LogicalBytes-r.row.ZeroBytes), mib(r.row.NewBytes), mib(r.row.ReusedBytes),
			mib(r.row.WrittenStoredBytes), mib(r.row.ExclusiveBytes))
	}

	// What the checks rest on. Each image is an ext4 filesystem, and a
	// committed layer is a snapshot of boxd's graph: the base layer's
	// holds the whole Debian filesystem (referenced: its non-zero blocks,
	// D below); the extra layer's image began as a copy of all of it.
	d := base.LogicalBytes - base.ZeroBytes
	if d < 64<<20 {
		t.Fatalf("the Debian base snapshot references only %d bytes: not a Debian root filesystem", d)
	}

	// 1. The base layer, shared by the debian and debian-extra images, is
	// one snapshot (checked by one() above), and the extra layer is a
	// delta on it: boxd stored only the blocks the small layer changed
	// (its file, the directory, inode and bitmap blocks, the journal's
	// blocks the writes went through), not a second copy of the base.
	if top.Parent != base.Name {
		t.Errorf("the extra layer's snapshot %s has parent %q, want the base's %s", top.Name, top.Parent, base.Name)
	}
	if top.NewBytes > d/10 || top.WrittenStoredBytes > base.WrittenStoredBytes/10 {
		t.Errorf("the extra layer (a 17-byte file and a whiteout) stored %d new bytes (%d in packs): over a tenth of the base's %d (%d)",
			top.NewBytes, top.WrittenStoredBytes, d, base.WrittenStoredBytes)
	}

	// 2. The copy is the same files unpacked into a fresh filesystem with
	// no parent: every block of it is "new" to its snapshot, but its
	// files' blocks are the base's chunks, so writing it added little to
	// the packs (ext4 puts file data in whole blocks; what differs is
	// metadata: inode times, the journal, the extra file).
	if cp.Parent != "" {
		t.Errorf("the copy's snapshot has parent %q, want none", cp.Parent)
	}
	if cp.WrittenStoredBytes > base.WrittenStoredBytes/4 {
		t.Errorf("storing the Debian copy added %d bytes to the packs, over a quarter of the base's %d: its files' blocks were not deduplicated",
			cp.WrittenStoredBytes, base.WrittenStoredBytes)
	}

	// 3. So the store holds the Debian filesystem about once, although
	// three snapshots (base, extra, copy) reference it in full: the
	// distinct chunks stay well under twice its size, and well under what
	// is referenced.
	if report.UniqueBytes > d*3/2+(bb.LogicalBytes-bb.ZeroBytes) {
		t.Errorf("unique bytes %d: more than 1.5 × the Debian filesystem (%d) plus busybox: the shared blocks are stored more than once", report.UniqueBytes, d)
	}
	if report.ReferencedBytes < 3*d {
		t.Errorf("referenced bytes %d: less than the three snapshots of the Debian filesystem (3 × %d)", report.ReferencedBytes, d)
	}
	// And removing the base layer alone would free little: the extra
	// layer and the copy reference nearly all of its chunks.
	if base.ExclusiveBytes > base.WrittenStoredBytes/4 {
		t.Errorf("the base's exclusive bytes %d: over a quarter of what it stored (%d); its chunks should be shared with the extra layer and the copy",
			base.ExclusiveBytes, base.WrittenStoredBytes)
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
