package cli_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// imageInfo is what `image build --json` and `image ls --json` print per image.
type imageInfo struct {
	Name     string    `json:"name"`
	Snapshot string    `json:"snapshot"`
	Size     int64     `json:"size"`
	Built    time.Time `json:"built"`
	Source   string    `json:"source"`
}

// smallTree writes a root filesystem tree small enough for a 32 MiB disk.
func smallTree(t *testing.T) string {
	t.Helper()
	tree := filepath.Join(t.TempDir(), "tree")
	for name, data := range map[string]string{
		"etc/os-release": "ID=debian\n",
		"usr/bin/hello":  "#!/bin/sh\necho hello\n",
	} {
		p := filepath.Join(tree, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return tree
}

func TestImageBuildAndList(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("needs mkfs.ext4 (Debian package e2fsprogs; scripts/deps.sh installs it)")
	}
	root := t.TempDir()
	r := ok(t, root, "image", "ls")
	if strings.TrimSpace(r.stdout) != "NAME  SNAPSHOT  SIZE  BUILT" {
		t.Errorf("empty ls: %q", r.stdout)
	}
	var imgs []imageInfo
	decodeJSON(t, ok(t, root, "image", "ls", "--json").stdout, &imgs)
	if imgs == nil || len(imgs) != 0 {
		t.Errorf("empty ls --json: %v, want []", imgs)
	}

	tree := smallTree(t)
	var img imageInfo
	decodeJSON(t, ok(t, root, "image", "build", "--tree", tree, "--size", "32M", "--json").stdout, &img)
	if img.Name != "debian-bookworm" || img.Snapshot != "image.debian-bookworm" || img.Size != 32<<20 || img.Source != "tree "+tree || time.Since(img.Built) > time.Minute {
		t.Fatalf("built %+v", img)
	}
	r = ok(t, root, "image", "build", "--tree", tree, "--size", "32M")
	if !strings.Contains(r.stdout, "image debian-bookworm is built") || r.stderr != "" {
		t.Errorf("second build: %v", r)
	}
	r = ok(t, root, "image", "build", "--tree", tree, "--size", "33554432", "--rebuild")
	if !strings.Contains(r.stdout, "image debian-bookworm built in") || !strings.Contains(r.stdout, "32 MiB disk") {
		t.Errorf("rebuild: %v", r)
	}
	r = ok(t, root, "image", "ls")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[1], "debian-bookworm  image.debian-bookworm  32 MiB  ") {
		t.Errorf("ls: %q", r.stdout)
	}
	decodeJSON(t, ok(t, root, "image", "ls", "--json").stdout, &imgs)
	if len(imgs) != 1 || imgs[0].Snapshot != "image.debian-bookworm" || !imgs[0].Built.After(img.Built.Add(-time.Second)) {
		t.Errorf("ls --json: %+v", imgs)
	}
	// The image is a snapshot like any other.
	var snaps []snapshot
	decodeJSON(t, ok(t, root, "store", "ls", "--json").stdout, &snaps)
	if len(snaps) != 1 || snaps[0].Name != "image.debian-bookworm" || snaps[0].Maps[0].Kind != "disk" {
		t.Errorf("store ls: %+v", snaps)
	}
}

func TestImageBuildRefuses(t *testing.T) {
	root := t.TempDir()
	tree := smallTree(t)
	tests := []struct {
		name string
		code int
		want []string
		args []string
	}{
		{"bad size", 2, []string{`size "4Q"`}, []string{"--size", "4Q"}},
		{"zero size", 2, []string{`size "0"`}, []string{"--size", "0"}},
		{"small size", 2, []string{"outside the sizes"}, []string{"--size", "1M", "--tree", tree}},
		{"unknown image", 2, []string{"debian-SUITE", "alpine"}, []string{"--name", "alpine"}},
		{"arguments", 2, []string{"takes no arguments"}, []string{"extra"}},
		{"not a root tree", 2, []string{"not a root filesystem tree"}, []string{"--tree", t.TempDir()}},
		{"missing tree", 3, []string{"no such file"}, []string{"--tree", filepath.Join(tree, "none")}},
		{"unknown flag", 2, []string{"flag provided but not defined"}, []string{"--nope"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fails(t, tt.code, root, tt.want, append([]string{"image", "build"}, tt.args...)...)
		})
	}
	fails(t, 2, root, []string{"takes no arguments"}, "image", "ls", "x")
}
