package guestkernel

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

func TestParseDepends(t *testing.T) {
	tests := []struct {
		name, out, want string
	}{
		{"debian 12", "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-48-cloud-amd64\n", "linux-image-6.1.0-48-cloud-amd64"},
		{"alternative only", "linux-image-cloud-amd64\n  Recommends: foo\n |Depends: linux-image-6.1.0-1-cloud-amd64\n", ""},
		{"virtual package skipped", "x\n  Depends: <linux-image-virtual>\n  Depends: linux-image-6.1.0-2-cloud-amd64\n", "linux-image-6.1.0-2-cloud-amd64"},
		{"none", "linux-image-cloud-amd64\n", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseDepends([]byte(tt.out))
			if tt.want == "" {
				if !errors.Is(err, errdefs.ErrNotFound) {
					t.Fatalf("got %q, %v; want not found", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

func TestFetchPackageRejects(t *testing.T) {
	for _, pkg := range []string{"busybox", "linux-image-", "linux-image-../x"} {
		if _, err := FetchPackage(context.Background(), t.TempDir(), pkg); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("FetchPackage(%q): err = %v, want invalid argument", pkg, err)
		}
	}
}

func TestFetchUnknownPackageFailsClearly(t *testing.T) {
	dir := t.TempDir()
	_, err := FetchPackage(context.Background(), dir, "linux-image-0.0.0-0-boxd-absent")
	if err == nil || !strings.Contains(err.Error(), "cannot fetch kernel package linux-image-0.0.0-0-boxd-absent") {
		t.Fatalf("err = %v, want a clear fetch failure", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("failed fetch left %d entries in the cache", len(entries))
	}
}

// TestFetchCached downloads the cloud kernel into a fresh cache, then checks a second Fetch reuses it.
func TestFetchCached(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads the ~26 MB kernel package; skipped with -short")
	}
	ctx := context.Background()
	dir := t.TempDir()
	k, err := Fetch(ctx, dir)
	if err != nil {
		t.Fatalf("cannot fetch the guest kernel: %v", err)
	}
	if filepath.Dir(k.Root) != dir || !strings.HasPrefix(k.Package, "linux-image-") {
		t.Fatalf("unexpected kernel %+v", k)
	}
	stamp := time.Unix(1, 0)
	if err := os.Chtimes(k.Vmlinuz, stamp, stamp); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	k2, err := Fetch(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if *k2 != *k {
		t.Fatalf("second Fetch returned %+v, first %+v", k2, k)
	}
	if fi, err := os.Stat(k.Vmlinuz); err != nil || !fi.ModTime().Equal(stamp) {
		t.Fatalf("second Fetch replaced the cached kernel (%v)", err)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{k.Package, resolvedFile}; !slices.Equal(names, want) {
		t.Fatalf("cache holds %q, want only %q", names, want)
	}
	t.Logf("cached Fetch took %v", time.Since(start).Round(time.Millisecond))
}

// ResolvePackage runs apt-cache once while apt's state stays as it was, and
// again once the lists or the sources change.
func TestResolvePackageKept(t *testing.T) {
	if _, err := exec.LookPath("apt-cache"); err != nil {
		t.Skip("needs apt-cache (a Debian host): ", err)
	}
	dir := t.TempDir()
	lists, sources := filepath.Join(dir, "lists"), filepath.Join(dir, "sources.list.d")
	for _, d := range []string{lists, sources} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	source := filepath.Join(sources, "debian.sources")
	if err := os.WriteFile(source, []byte("a"), 0o644); err != nil {
		t.Fatal(err)
	}
	old := aptState
	aptState = []string{lists, filepath.Join(dir, "sources.list"), sources}
	t.Cleanup(func() { aptState = old })
	ctx := context.Background()
	// resolveIn resolves through cache ("": none), as a new process when
	// fresh says so, and checks whether apt-cache ran.
	resolveIn := func(what, cache string, fresh, wantRun bool) {
		t.Helper()
		if fresh {
			resolved.Lock()
			resolved.stamp, resolved.pkg = "", ""
			resolved.Unlock()
		}
		before := aptRuns.Load()
		pkg, err := resolve(ctx, cache)
		if err != nil || !strings.HasPrefix(pkg, "linux-image-") {
			t.Fatalf("%s: resolve = %q, %v", what, pkg, err)
		}
		if ran := aptRuns.Load() > before; ran != wantRun {
			t.Fatalf("%s: apt-cache ran: %v, want %v", what, ran, wantRun)
		}
	}
	step := func(what string, wantRun bool) { t.Helper(); resolveIn(what, "", false, wantRun) }
	step("first", true)
	step("again", false)
	later := time.Now().Add(time.Minute)
	if err := os.Chtimes(lists, later, later); err != nil { // what apt-get update's renames do
		t.Fatal(err)
	}
	step("lists changed", true)
	step("again", false)
	if err := os.WriteFile(source, []byte("ab"), 0o644); err != nil {
		t.Fatal(err)
	}
	step("a source changed", true)
	if err := os.WriteFile(filepath.Join(dir, "sources.list"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	step("a source appeared", true)
	step("again", false)

	// Across processes, through the cache folder's file.
	cache := t.TempDir()
	fromCache := func(what string, wantRun bool) { t.Helper(); resolveIn(what, cache, true, wantRun) }
	fromCache("a new process, no file", true)
	fromCache("a new process, the file kept", false)
	if err := os.Chtimes(lists, later.Add(time.Minute), later.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	fromCache("a new process, lists changed since the file", true)
	fromCache("a new process, the file renewed", false)
	if err := os.WriteFile(filepath.Join(cache, resolvedFile), []byte("linux-image-x"), 0o644); err != nil {
		t.Fatal(err)
	}
	fromCache("a damaged file", true)
}
