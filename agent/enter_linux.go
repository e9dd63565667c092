package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// EnterName is the name the agent's binary runs under to start a process
// in a container's root file system (ProcessSpec.Root): the agent starts
// itself under it, in a mount namespace of its own (so that nothing it
// mounts outlives the process), with EnterArgs.
const EnterName = "boxd-enter"

// enterDirs are the box's file systems a container's root gets, bound over
// its own folders of the same names.
var enterDirs = []string{"proc", "sys", "dev"}

// EnterArgs are the arguments after EnterName: the root, the working
// folder, the credentials and the program with its arguments.
func EnterArgs(root, cwd string, uid, gid uint32, groups []uint32, args []string) []string {
	gs := make([]string, len(groups))
	for i, g := range groups {
		gs[i] = strconv.FormatUint(uint64(g), 10)
	}
	out := []string{root, cwd, strconv.FormatUint(uint64(uid), 10), strconv.FormatUint(uint64(gid), 10), strings.Join(gs, ","), "--"}
	return append(out, args...)
}

// Enter is the main of EnterName: it binds the box's /proc, /sys and /dev
// into the root, changes root and folder, takes the credentials and runs
// the program in its place, with the environment it was given. It returns
// only on failure, with 127 for a program that is not there, else 126,
// having said why on errOut.
func Enter(args []string, errOut io.Writer) int {
	fail := func(code int, err error) int {
		fmt.Fprintf(errOut, "%s: %v\n", EnterName, err)
		return code
	}
	if len(args) < 7 || args[5] != "--" {
		return fail(126, errors.New("usage: ROOT CWD UID GID GROUPS -- PROGRAM [ARG...]"))
	}
	root, cwd, argv := args[0], args[1], args[6:]
	uid, err1 := strconv.ParseUint(args[2], 10, 32)
	gid, err2 := strconv.ParseUint(args[3], 10, 32)
	var groups []int
	for g := range strings.SplitSeq(args[4], ",") {
		if g == "" {
			continue
		}
		n, err := strconv.ParseUint(g, 10, 32)
		if err != nil {
			return fail(126, fmt.Errorf("group %q: %w", g, err))
		}
		groups = append(groups, int(n))
	}
	if err := errors.Join(err1, err2); err != nil {
		return fail(126, err)
	}
	// The mount namespace is this process's own (the agent started it
	// with CLONE_NEWNS); the steps below run on one thread all the same.
	runtime.LockOSThread()
	for _, d := range enterDirs {
		target := filepath.Join(root, d)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fail(126, err)
		}
		if err := unix.Mount("/"+d, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fail(126, fmt.Errorf("binding /%s into %s: %w", d, root, err))
		}
	}
	if err := unix.Chroot(root); err != nil {
		return fail(126, fmt.Errorf("chroot %s: %w", root, err))
	}
	if cwd == "" {
		cwd = "/"
	}
	if err := unix.Chdir(cwd); err != nil {
		return fail(126, fmt.Errorf("working folder %s: %w", cwd, err))
	}
	if err := errors.Join(syscall.Setgroups(groups), syscall.Setgid(int(gid)), syscall.Setuid(int(uid))); err != nil {
		return fail(126, fmt.Errorf("credentials %d:%d: %w", uid, gid, err))
	}
	path, err := lookPath(argv[0], os.Environ())
	if err != nil {
		return fail(127, err)
	}
	err = syscall.Exec(path, argv, os.Environ())
	if errors.Is(err, syscall.ENOENT) {
		return fail(127, fmt.Errorf("%s: %w", argv[0], err))
	}
	return fail(126, fmt.Errorf("%s: %w", argv[0], err))
}
