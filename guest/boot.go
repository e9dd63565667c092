package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/boxd-dev/boxd/internal/guestkernel"
	"github.com/boxd-dev/boxd/internal/initramfs"
	"github.com/containerd/errdefs"
)

// Kernel returns the kernel boxes boot and the folder of its modules:
// kernelFlag if given (a kernel with the virtio drivers built in: modulesDir
// is ""), else Debian's cloud kernel, fetched into the root's
// cache/guestkernel on first use.
func Kernel(ctx context.Context, root, kernelFlag string) (path, modulesDir string, err error) {
	if kernelFlag != "" {
		fi, err := os.Stat(kernelFlag)
		if err != nil {
			return "", "", fmt.Errorf("kernel: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return "", "", fmt.Errorf("kernel %s is not a file: %w", kernelFlag, errdefs.ErrInvalidArgument)
		}
		abs, err := filepath.Abs(kernelFlag)
		return abs, "", err
	}
	k, err := guestkernel.Fetch(ctx, filepath.Join(root, "cache", "guestkernel"))
	if err != nil {
		return "", "", fmt.Errorf("fetching the guest kernel (%s; or give one with --kernel): %w", guestkernel.MetaPackage, err)
	}
	return k.Vmlinuz, k.ModulesDir, nil
}

// BoxModules are the modules a box needs, in the order they are wanted: the
// PCI transport, the agent's channel, the network and the disk. Their
// dependencies come with them.
var BoxModules = []string{"virtio_pci", "virtio_console", "virtio_net", "virtio_blk"}

// rootModules are the modules the root filesystem needs where the kernel
// has them as modules rather than built in.
var rootModules = []string{"ext4"}

// ModuleDir is the initramfs folder that holds the modules and their order.
const ModuleDir = "lib/modules/boxd"

// boxModuleOrder returns the modules to load from modulesDir, dependencies
// first: BoxModules, and rootModules that are modules in this kernel.
func boxModuleOrder(modulesDir string) ([]initramfs.Module, error) {
	mods, err := initramfs.ScanModules(modulesDir)
	if err != nil {
		return nil, err
	}
	wanted := append([]string(nil), BoxModules...)
	for _, m := range rootModules {
		if _, ok := mods[m]; ok {
			wanted = append(wanted, m)
		}
	}
	return mods.LoadOrder(wanted...)
}

// orderFile is the content of ModuleDir/order: the .ko file names, one a
// line, in load order.
func orderFile(order []initramfs.Module) []byte {
	var b bytes.Buffer
	for _, m := range order {
		b.WriteString(m.Name + ".ko\n")
	}
	return b.Bytes()
}

// initramfsVersion changes when what Initramfs writes changes, so cached
// images made by an older boxd are not reused.
const initramfsVersion = "boxd initramfs v1"

// Initramfs returns a gzip newc initramfs for boxes: /init is the static
// boxd-agent at agentPath; ModuleDir holds BoxModules from modulesDir with
// their dependencies (and ext4 if it is a module there) as NAME.ko, and
// their load order in ModuleDir/order; /dev/console (5, 1) lets the kernel
// open the console before devtmpfs is mounted; /dev, /proc, /sys, /run,
// /newroot and /tmp are empty. modulesDir "" means a kernel with its drivers
// built in: no modules, an empty order.
//
// The image is cached as the root's cache/initramfs/KEY.cpio.gz, KEY a hash
// of the agent and the modules' contents, and made again only when they
// change.
func Initramfs(ctx context.Context, root, modulesDir, agentPath string) (string, error) {
	agent, err := os.ReadFile(agentPath)
	if err != nil {
		return "", fmt.Errorf("agent: %w", err)
	}
	if err := checkStatic(agentPath); err != nil {
		return "", err
	}
	var order []initramfs.Module
	if modulesDir != "" {
		if order, err = boxModuleOrder(modulesDir); err != nil {
			return "", fmt.Errorf("kernel modules in %s: %w", modulesDir, err)
		}
	}
	h := sha256.New()
	h.Write([]byte(initramfsVersion + "\n"))
	sum := sha256.Sum256(agent)
	h.Write(sum[:])
	mods := make([][]byte, len(order))
	for i, m := range order {
		if mods[i], err = os.ReadFile(m.Path); err != nil {
			return "", fmt.Errorf("kernel module %s: %w", m.Name, err)
		}
		sum := sha256.Sum256(mods[i])
		h.Write([]byte(m.Name + "\n"))
		h.Write(sum[:])
	}
	dir := filepath.Join(root, "cache", "initramfs")
	path := filepath.Join(dir, hex.EncodeToString(h.Sum(nil)[:10])+".cpio.gz")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return "", err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	w := initramfs.NewGzipWriter(f)
	for _, d := range []string{"/dev", "/proc", "/sys", "/run", "/newroot"} {
		if err := w.Dir(d, 0o755); err != nil {
			return "", err
		}
	}
	if err := w.Dir("/tmp", 0o777|fs.ModeSticky); err != nil {
		return "", err
	}
	if err := w.CharDev("/dev/console", 0o600, 5, 1); err != nil {
		return "", err
	}
	if err := w.File("/init", 0o755, agent); err != nil {
		return "", err
	}
	if err := w.Dir("/"+ModuleDir, 0o755); err != nil {
		return "", err
	}
	for i, m := range order {
		if err := w.File("/"+ModuleDir+"/"+m.Name+".ko", 0o644, mods[i]); err != nil {
			return "", err
		}
	}
	if err := w.File("/"+ModuleDir+"/order", 0o644, orderFile(order)); err != nil {
		return "", err
	}
	if err := w.Close(); err != nil {
		return "", err
	}
	if err := errors.Join(f.Chmod(0o644), f.Sync(), f.Close()); err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", err
	}
	ok = true
	return path, syncDir(dir)
}

// checkStatic refuses an agent that needs a dynamic loader: nothing in the
// initramfs could load it.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("agent %s is not an executable (%w): %w", path, err, errdefs.ErrInvalidArgument)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("agent %s is linked dynamically; build it static (CGO_ENABLED=0, as make build does): %w", path, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// AgentEnv names the environment variable that points at boxd-agent.
const AgentEnv = "BOXD_AGENT"

// AgentPath finds the boxd-agent binary: AgentEnv if set, else boxd-agent
// beside the running executable, else in PATH.
func AgentPath() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		exe = ""
	}
	return findAgent(os.Getenv, exe, exec.LookPath)
}

func findAgent(getenv func(string) string, exe string, lookPath func(string) (string, error)) (string, error) {
	const name = "boxd-agent"
	if p := getenv(AgentEnv); p != "" {
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return "", fmt.Errorf("%s=%s names no agent binary: %w", AgentEnv, p, errdefs.ErrNotFound)
		}
		return filepath.Abs(p)
	}
	var looked []string
	if exe != "" {
		p := filepath.Join(filepath.Dir(exe), name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
		looked = append(looked, "beside "+exe)
	}
	if p, err := lookPath(name); err == nil {
		return filepath.Abs(p)
	}
	looked = append(looked, "in PATH")
	return "", fmt.Errorf("%s not found (%s): run make build, or set %s: %w", name, strings.Join(looked, ", "), AgentEnv, errdefs.ErrNotFound)
}

// Cmdline returns the kernel command line of a box called hostname. The
// agent, as /init, reads the boxd.* parameters: it mounts boxd.root itself
// (so there is no root=) and defaults the rest (boxd.rootfstype, boxd.port,
// boxd.ip, boxd.gw, boxd.dns) to suit a box's user network (QEMU's addresses). hostname must
// be a host name (no spaces); "" leaves the image's.
func Cmdline(hostname string) string {
	s := "console=ttyS0 panic=-1 quiet boxd.root=/dev/vda"
	if hostname != "" {
		s += " boxd.hostname=" + hostname
	}
	return s
}
