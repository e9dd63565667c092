package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/boxd-dev/boxd/internal/testutil"
)

// TestCreateOverlayFile checks boxd's qcow2 overlays with qemu-img and
// qemu-io: a clean image over its backing, reading through to it, taking
// writes, over raw and qcow2 backings of several sizes.
func TestCreateOverlayFile(t *testing.T) {
	ctx := context.Background()
	testutil.EnsurePackages(ctx, t, map[string]string{"qemu-img": "qemu-utils", "qemu-io": "qemu-utils"})
	dir := t.TempDir()
	raw := filepath.Join(dir, "base.raw")
	content := bytes.Repeat([]byte("boxd"), 1<<16) // 256 KiB
	if err := os.WriteFile(raw, content, 0o644); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big.raw")
	if err := os.WriteFile(big, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(big, 3<<30+12345*512); err != nil { // several L2 tables, not a whole number of them
		t.Fatal(err)
	}
	mid := filepath.Join(dir, "mid.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", raw, mid).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	for _, tc := range []struct {
		name, backing, format string
		size                  int64
	}{
		{"over raw", raw, "raw", int64(len(content))},
		{"over qcow2", mid, "qcow2", int64(len(content))},
		{"over a big raw", big, "raw", 3<<30 + 12345*512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			top := filepath.Join(t.TempDir(), "top.qcow2")
			if err := CreateOverlay(ctx, top, tc.backing); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("qemu-img", "check", top).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check: %v: %s", err, out)
			}
			out, err := exec.Command("qemu-img", "info", "--output=json", top).Output()
			if err != nil {
				t.Fatalf("qemu-img info: %v", err)
			}
			var info struct {
				Format         string `json:"format"`
				VirtualSize    int64  `json:"virtual-size"`
				Backing        string `json:"backing-filename"`
				BackingFormat  string `json:"backing-filename-format"`
				FormatSpecific struct {
					Data struct {
						Compat string `json:"compat"`
					} `json:"data"`
				} `json:"format-specific"`
			}
			if err := json.Unmarshal(out, &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "qcow2" || info.VirtualSize != tc.size || info.Backing != tc.backing || info.BackingFormat != tc.format || info.FormatSpecific.Data.Compat != "1.1" {
				t.Fatalf("qemu-img info: %s", out)
			}
			// Reads go through to the backing; writes land in the overlay.
			io := func(cmd string) string {
				t.Helper()
				out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, top).CombinedOutput()
				if err != nil || bytes.Contains(out, []byte("fail")) {
					t.Fatalf("qemu-io %q: %v: %s", cmd, err, out)
				}
				return string(out)
			}
			if tc.backing != big {
				io("read -P 0x62 0 1") // 'b' of "boxd", from the backing
			}
			io("write -P 0x5a 65536 131072")
			io("read -P 0x5a 65536 131072")
			if out, err := exec.Command("qemu-img", "check", top).CombinedOutput(); err != nil {
				t.Fatalf("qemu-img check after writes: %v: %s", err, out)
			}
			if tc.backing == raw {
				if b, _ := os.ReadFile(raw); !bytes.Equal(b, content) {
					t.Fatal("a write to the overlay reached its backing file")
				}
			}
			want := []string{top, tc.backing}
			if tc.backing == mid {
				want = append(want, raw)
			}
			if got := BackingChain(top); !slices.Equal(got, want) {
				t.Errorf("BackingChain = %q, want %q", got, want)
			}
		})
	}
}
