package qemu

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
	"github.com/containerd/errdefs"
)

// Snapshots taken before boxes ran on passt restore on QEMU's own user
// network (their device state holds it); later ones on passt; and neither
// value leaves the package through SnapshotSpec.
func TestStoredNetwork(t *testing.T) {
	r := &Runner{}
	for _, tc := range []struct {
		name      string
		label     string // LabelSpec as written
		restore   string // Network for Restore
		published string // Network SnapshotSpec gives
	}{
		{"before passt, default network", `{"MemSize":1,"CPUs":1,"Boot":"k"}`, netSlirp, runner.NetworkUser},
		{"before passt, user network named", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"net":"user"}}`, netSlirp, runner.NetworkUser},
		{"before passt, no network", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"net":"none"}}`, runner.NetworkNone, runner.NetworkNone},
		{"on passt", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"net":"passt"}}`, "", ""},
	} {
		s := snapshotter.Snapshot{Name: "s", Labels: map[string]string{runner.LabelRunner: "qemu", LabelSpec: tc.label}}
		spec, err := r.machineSpec(s)
		if err != nil || spec.Network != tc.restore {
			t.Errorf("%s: restores on %q (%v), want %q", tc.name, spec.Network, err, tc.restore)
		}
		pub, err := r.SnapshotSpec(s)
		if err != nil || pub.Network != tc.published {
			t.Errorf("%s: SnapshotSpec network %q (%v), want %q", tc.name, pub.Network, err, tc.published)
		}
		// What a machine of that spec writes in its next snapshot restores
		// the same way.
		b, _ := json.Marshal(toStored(spec))
		s.Labels[LabelSpec] = string(b)
		if again, _ := r.machineSpec(s); again.Network != tc.restore {
			t.Errorf("%s: after another snapshot, restores on %q, want %q", tc.name, again.Network, tc.restore)
		}
	}
}

// A new machine runs NewCPU; a snapshot keeps the model its machine ran
// and restores on it, LegacyCPU when its spec names none (taken before
// models were recorded); a spare of one model never takes over a machine
// of another; and a model that could end QEMU's option is refused.
func TestStoredCPU(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := &Runner{}
	cpuArg := func(spec runner.Spec) string {
		t.Helper()
		spec.Kernel, spec.MemSize = kernel, 64<<20
		args, err := r.args(spec)
		if err != nil {
			t.Fatalf("args of %+v: %v", spec, err)
		}
		i := slices.Index(args, "-cpu")
		if i < 0 || i+1 == len(args) {
			t.Fatalf("no -cpu in %q", args)
		}
		return args[i+1]
	}
	if got := cpuArg(runner.Spec{}); got != NewCPU {
		t.Errorf("a new machine runs %q, want %q", got, NewCPU)
	}
	for _, tc := range []struct {
		name  string
		label string
		want  string
	}{
		{"recorded none", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"net":"passt"}}`, LegacyCPU},
		{"recorded legacy", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"cpu":"qemu64"}}`, LegacyCPU},
		{"recorded new", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"cpu":"qemu64,+rdrand"}}`, NewCPU},
	} {
		s := snapshotter.Snapshot{Name: "s", Labels: map[string]string{runner.LabelRunner: "qemu", LabelSpec: tc.label}}
		spec, err := r.machineSpec(s)
		if err != nil || spec.CPUModel != tc.want {
			t.Errorf("%s: restores on %q (%v), want %q", tc.name, spec.CPUModel, err, tc.want)
			continue
		}
		if got := cpuArg(spec); got != tc.want {
			t.Errorf("%s: restore runs -cpu %q, want %q", tc.name, got, tc.want)
		}
		if pub, _ := r.SnapshotSpec(s); pub.CPUModel != tc.want {
			t.Errorf("%s: SnapshotSpec gives %q, want %q", tc.name, pub.CPUModel, tc.want)
		}
		// The machine's next snapshot records the same model.
		b, _ := json.Marshal(toStored(spec))
		s.Labels[LabelSpec] = string(b)
		if again, _ := r.machineSpec(s); again.CPUModel != tc.want {
			t.Errorf("%s: after another snapshot, restores on %q, want %q", tc.name, again.CPUModel, tc.want)
		}
	}
	base := runner.Spec{MemSize: 1, Kernel: "k"}
	legacy, fresh := base, base
	legacy.CPUModel = LegacyCPU
	if sameMachine(legacy, fresh) || sameMachine(fresh, legacy) {
		t.Error("a spare on one CPU model takes over a machine of another")
	}
	named := base
	named.CPUModel = NewCPU
	if !sameMachine(named, fresh) {
		t.Error("a spare on NewCPU does not take over a new machine")
	}
	for _, bad := range []string{"qemu64 -device x", "qemu64,,id=x", "qemu64\n", "max;", "x=$(y)"} {
		spec := base
		spec.Kernel, spec.CPUModel = kernel, bad
		if _, err := r.args(spec); !errdefs.IsInvalidArgument(err) {
			t.Errorf("CPU model %q: args gave %v, want an invalid-argument error", bad, err)
		}
	}
}

// A new machine runs NewLayout; a snapshot keeps the layout its machine
// ran and restores on it, LegacyLayout when its spec names none; a
// machine booted anew from a snapshot (SnapshotSpec) gets NewLayout; a
// spare of one layout never takes over a machine of another; and an
// unknown layout is refused.
func TestStoredLayout(t *testing.T) {
	kernel := filepath.Join(t.TempDir(), "vmlinuz")
	if err := os.WriteFile(kernel, []byte("k"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := &Runner{}
	serialArg := func(spec runner.Spec) string {
		t.Helper()
		spec.Kernel, spec.MemSize = kernel, 64<<20
		if _, err := r.args(spec); err != nil {
			t.Fatalf("args of %+v: %v", spec, err)
		}
		return serialDevice(spec)
	}
	if got := serialArg(runner.Spec{}); !strings.HasSuffix(got, ",max_ports=2") {
		t.Errorf("a new machine's serial device is %q, want max_ports=2", got)
	}
	for _, tc := range []struct {
		name  string
		label string
		want  string
		ports string
	}{
		{"recorded none", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"cpu":"qemu64,+rdrand"}}`, LegacyLayout, ",max_ports=31"},
		{"recorded legacy", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"layout":"serial31"}}`, LegacyLayout, ",max_ports=31"},
		{"recorded new", `{"MemSize":1,"CPUs":1,"Boot":"k","Options":{"layout":"serial2"}}`, NewLayout, ",max_ports=2"},
	} {
		s := snapshotter.Snapshot{Name: "s", Labels: map[string]string{runner.LabelRunner: "qemu", LabelSpec: tc.label}}
		spec, err := r.machineSpec(s)
		if err != nil || spec.Layout != tc.want {
			t.Errorf("%s: restores on %q (%v), want %q", tc.name, spec.Layout, err, tc.want)
			continue
		}
		if got := serialArg(spec); !strings.HasSuffix(got, tc.ports) {
			t.Errorf("%s: restore runs %q, want %s", tc.name, got, tc.ports)
		}
		if pub, _ := r.SnapshotSpec(s); pub.Layout != "" {
			t.Errorf("%s: SnapshotSpec gives layout %q, want none (a new machine's)", tc.name, pub.Layout)
		}
		b, _ := json.Marshal(toStored(spec))
		s.Labels[LabelSpec] = string(b)
		if again, _ := r.machineSpec(s); again.Layout != tc.want {
			t.Errorf("%s: after another snapshot, restores on %q, want %q", tc.name, again.Layout, tc.want)
		}
	}
	base := runner.Spec{MemSize: 1, Kernel: "k"}
	legacy, fresh, named := base, base, base
	legacy.Layout, named.Layout = LegacyLayout, NewLayout
	if sameMachine(legacy, fresh) || sameMachine(fresh, legacy) {
		t.Error("a spare of one layout takes over a machine of another")
	}
	if !sameMachine(named, fresh) {
		t.Error("a spare of NewLayout does not take over a new machine")
	}
	spec := base
	spec.Kernel, spec.Layout = kernel, "serial7"
	if _, err := r.args(spec); !errdefs.IsInvalidArgument(err) {
		t.Errorf("layout serial7: args gave %v, want an invalid-argument error", err)
	}
}
