package qemu

import (
	"encoding/json"
	"testing"

	"github.com/boxd-dev/boxd/runner"
	"github.com/boxd-dev/boxd/snapshotter"
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
