package box_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/box"
	"github.com/boxd-dev/boxd/runner"
	"github.com/containerd/errdefs"
)

// stubRunner is a runner that only answers Name and Capabilities.
type stubRunner struct {
	name string
	caps runner.Capabilities
}

func (s stubRunner) Name() string                      { return s.name }
func (s stubRunner) Capabilities() runner.Capabilities { return s.caps }
func (s stubRunner) Start(context.Context, runner.Spec) (runner.Machine, error) {
	return nil, errors.New("stub")
}
func (s stubRunner) Restore(context.Context, string, runner.RestoreOptions) (runner.Machine, error) {
	return nil, errors.New("stub")
}

// diskStub is a stubRunner with runner.DiskFiles.
type diskStub struct {
	stubRunner
	runner.DiskFiles
}

func (d diskStub) Name() string { return d.stubRunner.Name() }

func TestChooseRunner(t *testing.T) {
	linux := runner.Capabilities{Linux: true}
	runners := []runner.Runner{
		diskStub{stubRunner: stubRunner{"qemu", linux}},
		stubRunner{"kvm", runner.Capabilities{NoLinux: "the CPU lacks hardware virtualisation"}},
		stubRunner{"nodisk", linux},
		diskStub{stubRunner: stubRunner{"mute", runner.Capabilities{}}},
	}
	for _, tc := range []struct {
		want string
		got  string // the runner chosen; "" when refused
		err  error  // the refusal's category
		says string // part of the refusal
	}{
		{"", "qemu", nil, ""},
		{"auto", "qemu", nil, ""},
		{"qemu", "qemu", nil, ""},
		{"kvm", "", errdefs.ErrNotImplemented, "the kvm runner cannot boot Linux boxes here: the CPU lacks hardware virtualisation; use --runner qemu"},
		{"nodisk", "", errdefs.ErrNotImplemented, "cannot keep a box's disk"},
		{"mute", "", errdefs.ErrNotImplemented, "it does not boot Linux guests"},
		{"xen", "", errdefs.ErrInvalidArgument, `runner "xen": want auto, kvm, mute, nodisk or qemu`},
		{"QEMU", "", errdefs.ErrInvalidArgument, `runner "QEMU"`},
	} {
		r, err := box.ChooseRunner(runners, "qemu", tc.want)
		if tc.err == nil {
			if err != nil || r.Name() != tc.got {
				t.Errorf("ChooseRunner(%q) = %v, %v; want %s", tc.want, r, err, tc.got)
			}
			continue
		}
		if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("ChooseRunner(%q): %v; want %v saying %q", tc.want, err, tc.err, tc.says)
		}
	}
}

// A box asking for a runner that cannot run it is refused before anything
// is made; one that names no runner gets the default and records it.
func TestCreateRunnerChoice(t *testing.T) {
	e := newFakeEnv(t, false)
	ctx := context.Background()
	if _, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: fakeImage, Runner: "kvm"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("create on an unknown runner: %v, want ErrInvalidArgument", err)
	}
	if _, err := e.mgr.Get("dev"); !errors.Is(err, box.ErrNotFound) {
		t.Fatalf("a refused box was recorded: %v", err)
	}
	bx, err := e.mgr.Create(ctx, box.CreateOptions{Name: "dev", Image: fakeImage, Runner: box.RunnerAuto})
	if err != nil || bx.Runner != "fake" {
		t.Fatalf("create with runner auto: %+v, %v", bx, err)
	}
	if boxes, _ := e.mgr.List(); len(boxes) != 1 || boxes[0].Runner != "fake" {
		t.Fatalf("List: %+v", boxes)
	}
}
