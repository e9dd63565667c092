package initramfs

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io/fs"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/errdefs"
)

// ErrModuleNotFound is returned by LoadOrder when a wanted module, or one of its dependencies, is not in the
// set. It wraps errdefs.ErrNotFound.
var ErrModuleNotFound = fmt.Errorf("kernel module not found: %w", errdefs.ErrNotFound)

// ErrDependencyCycle is returned by LoadOrder when modules depend on each other in a cycle. It wraps
// errdefs.ErrInvalidArgument.
var ErrDependencyCycle = fmt.Errorf("kernel module dependency cycle: %w", errdefs.ErrInvalidArgument)

// Module is one loadable kernel module, as described by its .modinfo section.
type Module struct {
	Name    string   // the module's name, with '_' never '-' (name=, else the file name)
	Path    string   // the .ko file
	Depends []string // names of the modules it needs loaded first (depends=)
}

// ReadModule reads the .modinfo section of the uncompressed module file path. A module without a name= entry
// is named after its file, as the kernel does: "virtio-rng.ko" is virtio_rng.
func ReadModule(path string) (Module, error) {
	f, err := elf.Open(path)
	if err != nil {
		return Module{}, fmt.Errorf("initramfs: module %s: %w", path, err)
	}
	defer f.Close()
	sec := f.Section(".modinfo")
	if sec == nil {
		return Module{}, fmt.Errorf("initramfs: module %s: no .modinfo section: %w", path, errdefs.ErrInvalidArgument)
	}
	data, err := sec.Data()
	if err != nil {
		return Module{}, fmt.Errorf("initramfs: module %s: .modinfo: %w", path, err)
	}
	m := Module{Path: path}
	for _, field := range bytes.Split(data, []byte{0}) {
		key, value, ok := strings.Cut(string(field), "=")
		if !ok {
			continue // padding between entries
		}
		switch key {
		case "name":
			m.Name = moduleName(value)
		case "depends":
			for _, dep := range strings.Split(value, ",") {
				if dep = strings.TrimSpace(dep); dep != "" {
					m.Depends = append(m.Depends, moduleName(dep))
				}
			}
		}
	}
	if m.Name == "" {
		m.Name = moduleName(strings.TrimSuffix(filepath.Base(path), ".ko"))
	}
	return m, nil
}

// Modules is a set of modules by name.
type Modules map[string]Module

// ScanModules reads every .ko file under dir, such as a kernel's lib/modules/RELEASE. Compressed modules
// (.ko.xz, .ko.zst) are not read. Two files with the same module name are an error.
func ScanModules(dir string) (Modules, error) {
	mods := Modules{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("initramfs: scan modules: %w", err)
		}
		if d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		m, err := ReadModule(p)
		if err != nil {
			return err
		}
		if old, ok := mods[m.Name]; ok {
			return fmt.Errorf("initramfs: module %s in both %s and %s: %w", m.Name, old.Path, p, errdefs.ErrAlreadyExists)
		}
		mods[m.Name] = m
		return nil
	})
	if err != nil {
		return nil, err
	}
	return mods, nil
}

// LoadOrder returns the wanted modules and everything they depend on, each once, dependencies before the
// modules that need them, in the order the wanted modules are given (and, within a module, the order of its
// depends= list). Names may use '-' or '_'.
func (mods Modules) LoadOrder(wanted ...string) ([]Module, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []Module
	var visit func(name string, chain []string) error
	visit = func(name string, chain []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("initramfs: %s: %w", strings.Join(append(chain, name), " -> "), ErrDependencyCycle)
		}
		m, ok := mods[name]
		if !ok {
			if len(chain) == 0 {
				return fmt.Errorf("initramfs: module %s: %w", name, ErrModuleNotFound)
			}
			return fmt.Errorf("initramfs: module %s (needed by %s): %w", name, strings.Join(chain, " -> "), ErrModuleNotFound)
		}
		state[name] = visiting
		for _, dep := range m.Depends {
			if err := visit(dep, append(chain[:len(chain):len(chain)], name)); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, m)
		return nil
	}
	for _, name := range wanted {
		if err := visit(moduleName(name), nil); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// Names returns the names of the modules in the set, sorted.
func (mods Modules) Names() []string {
	names := make([]string, 0, len(mods))
	for name := range mods {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// moduleName normalises a module name the way the kernel does: '-' and '_' are the same.
func moduleName(s string) string { return strings.ReplaceAll(s, "-", "_") }
