package box

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/containerd/errdefs"
)

func TestChooseRunner(t *testing.T) {
	cpus := map[string]string{
		"no-virt":   "processor\t: 0\nflags\t\t: fpu sse2 lm hypervisor\n",
		"vmx":       "processor\t: 0\nflags\t\t: fpu vmx sse2 lm\n",
		"svm":       "flags\t\t: fpu svm\n",
		"empty":     "",
		"vmx-flags": "vmx flags\t: ept\nflags\t\t: fpu\n", // EPT features, not the vmx flag
	}
	for _, tc := range []struct {
		want, cpu string
		got       string // the runner chosen; "" when refused
		err       error  // the refusal's category
		says      string // part of the refusal
	}{
		{"", "no-virt", RunnerQEMU, nil, ""},
		{"auto", "no-virt", RunnerQEMU, nil, ""},
		{"auto", "vmx", RunnerQEMU, nil, ""},
		{"qemu", "no-virt", RunnerQEMU, nil, ""},
		{"qemu", "svm", RunnerQEMU, nil, ""},
		{"kvm", "no-virt", "", errdefs.ErrNotImplemented, "the kvm runner cannot boot Linux guests on this host because its CPU lacks hardware virtualisation (no vmx or svm"},
		{"kvm", "empty", "", errdefs.ErrNotImplemented, "CPU lacks hardware virtualisation"},
		{"kvm", "vmx-flags", "", errdefs.ErrNotImplemented, "CPU lacks hardware virtualisation"},
		{"kvm", "vmx", "", errdefs.ErrNotImplemented, "booting Linux boxes on the kvm runner is not supported yet"},
		{"kvm", "svm", "", errdefs.ErrNotImplemented, "not supported yet"},
		{"xen", "vmx", "", errdefs.ErrInvalidArgument, `runner "xen": want auto, kvm or qemu`},
		{"KVM", "vmx", "", errdefs.ErrInvalidArgument, `runner "KVM"`},
	} {
		t.Run(tc.want+" on "+tc.cpu, func(t *testing.T) {
			got, err := chooseRunner(tc.want, func() ([]byte, error) { return []byte(cpus[tc.cpu]), nil })
			if got != tc.got {
				t.Errorf("chose %q, want %q", got, tc.got)
			}
			if tc.err == nil {
				if err != nil {
					t.Errorf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.err) || err == nil || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %v, want %v saying %q", err, tc.err, tc.says)
			}
		})
	}
	if _, err := chooseRunner("kvm", func() ([]byte, error) { return nil, os.ErrNotExist }); !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Errorf("kvm without /proc/cpuinfo: %v", err)
	}
}

// TestChooseRunnerHost checks the refusal of kvm on this host, whatever
// its CPU.
func TestChooseRunnerHost(t *testing.T) {
	got, err := ChooseRunner(RunnerKVM)
	if got != "" || !errors.Is(err, errdefs.ErrNotImplemented) {
		t.Fatalf("kvm: %q, %v", got, err)
	}
	info, _ := os.ReadFile("/proc/cpuinfo")
	want := "not supported yet"
	if !qemu.HasVirtFlag(info) {
		want = "because its CPU lacks hardware virtualisation"
	}
	if !strings.Contains(err.Error(), want) || strings.Count(err.Error(), ".") > 0 {
		t.Errorf("kvm here: %q, want one sentence saying %q", err, want)
	}
}
