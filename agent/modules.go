package agent

import (
	"bufio"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/errdefs"
)

// ModulesDir is where the initramfs carries the kernel modules the agent loads, with ModuleOrderFile beside them.
const ModulesDir = "/lib/modules/boxd"

// ModuleOrderFile lists the modules in ModulesDir to load, one file name a line, each after the modules it
// depends on. Blank lines and lines that start with '#' are skipped.
const ModuleOrderFile = ModulesDir + "/order"

// ReadModuleOrder reads a module order file (see ModuleOrderFile) and returns the file names in order. A name
// with a '/' or one that is not a .ko file (or a .ko.xz, .ko.zst, .ko.gz) is an error that wraps
// errdefs.ErrInvalidArgument.
func ReadModuleOrder(r io.Reader) ([]string, error) {
	var names []string
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.ContainsRune(line, '/') || line == "." || line == ".." {
			return nil, fmt.Errorf("agent: module order line %d: %q is not a file name in %s: %w", n, line, ModulesDir, errdefs.ErrInvalidArgument)
		}
		if moduleCompression(line) == "" {
			return nil, fmt.Errorf("agent: module order line %d: %q is not a .ko file: %w", n, line, errdefs.ErrInvalidArgument)
		}
		names = append(names, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("agent: module order: %w", err)
	}
	return names, nil
}

// moduleCompression returns "ko" for a plain module file name, the compression suffix ("xz", "zst", "gz") for a
// compressed one, and "" for a name that is not a module.
func moduleCompression(name string) string {
	for _, c := range []string{"xz", "zst", "gz"} {
		if strings.HasSuffix(name, ".ko."+c) && len(name) > len(".ko."+c) {
			return c
		}
	}
	if strings.HasSuffix(name, ".ko") && len(name) > len(".ko") {
		return "ko"
	}
	return ""
}
