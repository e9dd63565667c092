package box

import (
	"fmt"
	"os"

	"github.com/boxd-dev/boxd/errcat"
	"github.com/boxd-dev/boxd/runner/qemu"
	"github.com/containerd/errdefs"
)

// Runners a box may ask for.
const (
	RunnerAuto = "auto" // the runner boxd picks: QEMU, the only one that boots Linux boxes today
	RunnerKVM  = "kvm"  // boxd's own VMM on /dev/kvm
	RunnerQEMU = "qemu" // QEMU, with KVM where the CPU has vmx or svm, else TCG
)

// ChooseRunner returns the runner a box that asks for want runs on ("" means
// RunnerAuto): RunnerQEMU for auto and qemu. The kvm runner cannot boot
// Linux boxes yet, so asking for it is refused with errdefs.ErrNotImplemented,
// saying why on this host; any other name is errdefs.ErrInvalidArgument.
func ChooseRunner(want string) (string, error) {
	return chooseRunner(want, func() ([]byte, error) { return os.ReadFile("/proc/cpuinfo") })
}

// chooseRunner is ChooseRunner reading the host's cpuinfo with cpuinfo.
func chooseRunner(want string, cpuinfo func() ([]byte, error)) (string, error) {
	switch want {
	case "", RunnerAuto, RunnerQEMU:
		return RunnerQEMU, nil
	case RunnerKVM:
		if info, err := cpuinfo(); err != nil || !qemu.HasVirtFlag(info) {
			return "", errcat.NotSupported("the kvm runner cannot boot Linux guests on this host because its CPU lacks hardware virtualisation (no vmx or svm flag in /proc/cpuinfo); use --runner qemu")
		}
		return "", errcat.NotSupported("booting Linux boxes on the kvm runner is not supported yet (it runs only boxd's own test guest); use --runner qemu")
	}
	return "", fmt.Errorf("runner %q: want %s, %s or %s: %w", want, RunnerAuto, RunnerKVM, RunnerQEMU, errdefs.ErrInvalidArgument)
}
