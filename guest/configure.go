package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
)

// DefaultHostname is the host name an image carries; the agent sets each
// box's own at boot (boxd.hostname).
const DefaultHostname = "boxd"

// DefaultDNS is the resolver address of a box's user network (passt forwards
// it to the host's resolver), which boxes use unless told otherwise (boxd.dns).
const DefaultDNS = "10.0.2.3"

// configFiles are the files ConfigureTree writes, relative to the tree.
var configFiles = []struct {
	path string
	mode fs.FileMode
	data string
}{
	{"etc/hostname", 0o644, DefaultHostname + "\n"},
	{"etc/hosts", 0o644, "127.0.0.1\tlocalhost\n127.0.1.1\t" + DefaultHostname + "\n" +
		"::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"},
	// The agent mounts the root disk itself; this line is for the tools
	// that read fstab (mount -o remount, findmnt).
	{"etc/fstab", 0o644, "# boxd: the box's root disk\n/dev/vda\t/\text4\tdefaults\t0\t1\n"},
	// Empty: the agent gives each box, and each fork, its own.
	{"etc/machine-id", 0o444, ""},
	// debootstrap copies the host's; a box has its own network.
	{"etc/resolv.conf", 0o644, "nameserver " + DefaultDNS + "\n"},
}

// ConfigureTree makes a root filesystem tree ready to boot as a box: host
// name, hosts, fstab, an empty machine-id, resolv.conf, root's home, and no
// package files left by debootstrap. /etc/os-release is left as it is.
//
// Files are replaced (a new file renamed over the old), never written into,
// so a tree whose files are hard links into a cached tree, as BuildImage
// stages it, leaves the cache unchanged.
func ConfigureTree(dir string) error {
	if err := looksLikeRoot(dir); err != nil {
		return err
	}
	for _, f := range configFiles {
		if err := replaceFile(filepath.Join(dir, f.path), []byte(f.data), f.mode); err != nil {
			return fmt.Errorf("configuring /%s: %w", f.path, err)
		}
	}
	home := filepath.Join(dir, "root")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return fmt.Errorf("configuring /root: %w", err)
	}
	if err := os.Chmod(home, 0o700); err != nil {
		return fmt.Errorf("configuring /root: %w", err)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "var/cache/apt/archives/*.deb"))
	for _, d := range debs {
		if err := os.Remove(d); err != nil {
			return fmt.Errorf("removing debootstrap's packages: %w", err)
		}
	}
	return nil
}

// looksLikeRoot checks that dir holds a root filesystem: etc/ and usr/.
func looksLikeRoot(dir string) error {
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("tree: %w", err)
	}
	for _, sub := range []string{"etc", "usr"} {
		fi, err := os.Stat(filepath.Join(dir, sub))
		if err != nil || !fi.IsDir() {
			return fmt.Errorf("%s is not a root filesystem tree (no %s/ folder): %w", dir, sub, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// replaceFile writes data to a new file beside path and renames it over
// path, replacing a file or a symbolic link there.
func replaceFile(path string, data []byte, mode fs.FileMode) error {
	if fi, err := os.Lstat(path); err == nil && fi.IsDir() {
		return fmt.Errorf("%s is a folder", path)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	err = errors.Join(err, f.Chmod(mode), f.Close())
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// stageTree makes dst a copy of the tree src that BuildImage can configure
// without touching src: hard links where src and dst share a filesystem
// (instant, and ConfigureTree replaces rather than writes), a full copy
// elsewhere.
func stageTree(ctx context.Context, src, dst string) error {
	out, err := exec.CommandContext(ctx, "cp", "-a", "-l", src+"/.", dst).CombinedOutput()
	if err == nil {
		return nil
	}
	if rerr := removeTree(dst); rerr != nil {
		return rerr
	}
	if out2, err2 := exec.CommandContext(ctx, "cp", "-a", src+"/.", dst).CombinedOutput(); err2 != nil {
		return fmt.Errorf("copying %s: %w: %s (hard links: %s)", src, err2, strings.TrimSpace(string(out2)), strings.TrimSpace(string(out)))
	}
	return nil
}
