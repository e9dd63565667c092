package initramfs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"

	"github.com/containerd/errdefs"
)

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestReadModule(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		file    string
		modinfo []string
		want    Module
	}{
		{"a/virtio_net.ko", []string{"license=GPL", "depends=virtio,net_failover,virtio_ring", "name=virtio_net", "vermagic=6.1"},
			Module{Name: "virtio_net", Depends: []string{"virtio", "net_failover", "virtio_ring"}}},
		{"b/virtio.ko", []string{"depends=", "name=virtio"}, Module{Name: "virtio"}},
		{"c/virtio-rng.ko", []string{"depends=virtio-ring"}, Module{Name: "virtio_rng", Depends: []string{"virtio_ring"}}},
		{"d/x.ko", []string{"", "name=renamed", "", "depends=y"}, Module{Name: "renamed", Depends: []string{"y"}}},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			p := filepath.Join(dir, tt.file)
			testutil.WriteELF(t, p, tt.modinfo...)
			got, err := ReadModule(p)
			if err != nil {
				t.Fatal(err)
			}
			tt.want.Path = p
			if got.Name != tt.want.Name || got.Path != tt.want.Path || strings.Join(got.Depends, ",") != strings.Join(tt.want.Depends, ",") {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	t.Run("not ELF", func(t *testing.T) {
		p := filepath.Join(dir, "junk.ko")
		must(t, os.WriteFile(p, []byte("not an ELF file"), 0o644))
		if _, err := ReadModule(p); err == nil {
			t.Fatal("ReadModule on junk returned nil error")
		}
	})
}

// fakeModules writes one synthetic module per entry of deps (name -> depends= value) under a fresh folder and
// scans it.
func fakeModules(t *testing.T, deps map[string]string) Modules {
	t.Helper()
	dir := t.TempDir()
	for name, dep := range deps {
		testutil.WriteELF(t, filepath.Join(dir, "kernel", name[:1], name+".ko"), "depends="+dep, "name="+name)
	}
	mods, err := ScanModules(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(mods) != len(deps) {
		t.Fatalf("scanned %d modules (%v), wrote %d", len(mods), mods.Names(), len(deps))
	}
	return mods
}

func TestLoadOrder(t *testing.T) {
	// The shape of the Debian cloud kernel's virtio modules.
	virtio := map[string]string{
		"virtio_ring":           "",
		"virtio":                "",
		"virtio_pci_legacy_dev": "",
		"virtio_pci_modern_dev": "",
		"virtio_pci":            "virtio_pci_legacy_dev,virtio_pci_modern_dev,virtio,virtio_ring",
		"virtio_console":        "virtio,virtio_ring",
		"virtio_blk":            "virtio,virtio_ring",
		"failover":              "",
		"net_failover":          "failover",
		"virtio_net":            "net_failover,virtio,virtio_ring",
		"unrelated":             "",
	}
	tests := []struct {
		name    string
		deps    map[string]string
		wanted  []string
		want    string // names joined by spaces
		wantErr error
		errText string
	}{
		{name: "nothing wanted", deps: virtio, want: ""},
		{name: "leaf", deps: virtio, wanted: []string{"virtio"}, want: "virtio"},
		{name: "box drivers", deps: virtio, wanted: []string{"virtio_pci", "virtio_console", "virtio_blk", "virtio_net"},
			want: "virtio_pci_legacy_dev virtio_pci_modern_dev virtio virtio_ring virtio_pci virtio_console virtio_blk failover net_failover virtio_net"},
		{name: "each once, dashes accepted", deps: virtio, wanted: []string{"virtio-net", "virtio_net", "net-failover", "failover"},
			want: "failover net_failover virtio virtio_ring virtio_net"},
		{name: "diamond", deps: map[string]string{"a": "b,c", "b": "d", "c": "d", "d": ""}, wanted: []string{"a"},
			want: "d b c a"},
		{name: "wanted missing", deps: virtio, wanted: []string{"virtio_vsock"}, wantErr: ErrModuleNotFound,
			errText: "module virtio_vsock: kernel module not found"},
		{name: "dependency missing", deps: map[string]string{"a": "b", "b": "gone"}, wanted: []string{"a"},
			wantErr: ErrModuleNotFound, errText: "module gone (needed by a -> b)"},
		{name: "cycle", deps: map[string]string{"a": "b", "b": "c", "c": "a"}, wanted: []string{"a"},
			wantErr: ErrDependencyCycle, errText: "a -> b -> c -> a"},
		{name: "self cycle", deps: map[string]string{"a": "a"}, wanted: []string{"a"},
			wantErr: ErrDependencyCycle, errText: "a -> a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			order, err := fakeModules(t, tt.deps).LoadOrder(tt.wanted...)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %v containing %q", err, tt.wantErr, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, m := range order {
				names = append(names, m.Name)
			}
			if got := strings.Join(names, " "); got != tt.want {
				t.Fatalf("order = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestErrorCategories(t *testing.T) {
	if !errdefs.IsNotFound(ErrModuleNotFound) || !errdefs.IsInvalidArgument(ErrDependencyCycle) {
		t.Fatal("module errors lost their errdefs category")
	}
}

func TestScanModulesDuplicate(t *testing.T) {
	dir := t.TempDir()
	testutil.WriteELF(t, filepath.Join(dir, "a", "m.ko"), "name=m")
	testutil.WriteELF(t, filepath.Join(dir, "b", "m.ko"), "name=m")
	if _, err := ScanModules(dir); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("err = %v, want already exists", err)
	}
	if _, err := ScanModules(filepath.Join(dir, "absent")); err == nil {
		t.Fatal("scanning a missing folder returned nil error")
	}
}
