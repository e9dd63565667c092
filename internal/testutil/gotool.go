package testutil

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// GoTool is a program the tests build from the Go module proxy once and
// keep between runs.
type GoTool struct {
	Name    string   // the cache folder's name, with Version: NAME-VERSION
	Version string   // the module version, e.g. v1.34.0
	Pkgs    []string // the packages of the binaries, without @VERSION
	Tags    string   // build tags, comma-separated
}

// ToolsCache is where GoTool keeps what it builds ($BOXD_TOOLS_CACHE
// overrides it).
func ToolsCache() string {
	if dir := os.Getenv("BOXD_TOOLS_CACHE"); dir != "" {
		return dir
	}
	return "/var/cache/boxd-test/tools"
}

// Build returns the folder holding the tool's binaries, building them
// into the cache the first time (go install: minutes on two cores) under
// a lock, so concurrent tests build once and a half-built folder is never
// taken.
func (g GoTool) Build(ctx context.Context, t testing.TB) string {
	t.Helper()
	dir := filepath.Join(ToolsCache(), g.Name+"-"+g.Version)
	done := dir + ".complete"
	if _, err := os.Stat(done); err == nil {
		return dir
	}
	if err := os.MkdirAll(ToolsCache(), 0o755); err != nil {
		t.Fatal(err)
	}
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(done); err == nil {
		return dir // another test built it meanwhile
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(ToolsCache(), "."+g.Name+"-*")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	t.Logf("building %s %s into %s (once)", g.Name, g.Version, dir)
	args := []string{"install"}
	if g.Tags != "" {
		args = append(args, "-tags", g.Tags)
	}
	for _, p := range g.Pkgs {
		args = append(args, p+"@"+g.Version)
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOBIN="+tmp, "GOFLAGS=-mod=mod")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s %s: %v\n%s", g.Name, g.Version, err, out)
	}
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(done, []byte(strings.Join(g.Pkgs, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Crictl is the CRI client the Kubernetes path is tested with.
var Crictl = GoTool{Name: "crictl", Version: "v1.34.0", Pkgs: []string{"sigs.k8s.io/cri-tools/cmd/crictl"}}

// Containerd2 is containerd 2.x, its ctr and runc shim, which the
// containerd tests also run against.
var Containerd2 = GoTool{
	Name: "containerd", Version: "v2.4.2", Tags: "no_btrfs,no_devmapper,no_zfs",
	Pkgs: []string{
		"github.com/containerd/containerd/v2/cmd/containerd",
		"github.com/containerd/containerd/v2/cmd/ctr",
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2",
	},
}
