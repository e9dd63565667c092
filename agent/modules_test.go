package agent

import (
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

func TestReadModuleOrder(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []string
		wantErr bool
	}{
		{name: "empty", in: "", want: nil},
		{
			name: "box modules",
			in:   "virtio_ring.ko\nvirtio.ko\nvirtio_pci.ko\nvirtio_console.ko\nvirtio_blk.ko\n",
			want: []string{"virtio_ring.ko", "virtio.ko", "virtio_pci.ko", "virtio_console.ko", "virtio_blk.ko"},
		},
		{
			name: "comments, blanks, spaces, no final newline",
			in:   "# the order\n\n  failover.ko  \n\t\nnet_failover.ko",
			want: []string{"failover.ko", "net_failover.ko"},
		},
		{name: "compressed", in: "a.ko.xz\nb.ko.zst\nc.ko.gz\n", want: []string{"a.ko.xz", "b.ko.zst", "c.ko.gz"}},
		{name: "path", in: "kernel/drivers/virtio.ko\n", wantErr: true},
		{name: "not a module", in: "virtio\n", wantErr: true},
		{name: "bare suffix", in: ".ko\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ReadModuleOrder(strings.NewReader(tt.in))
			if tt.wantErr {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("ReadModuleOrder = %v, %v; want an invalid-argument error", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ReadModuleOrder = %q, want %q", got, tt.want)
			}
		})
	}
}
