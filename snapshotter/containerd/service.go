package containerd

import (
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"google.golang.org/grpc"
)

// NewServer returns a gRPC server with containerd's snapshots API on sn
// registered: what containerd's proxy_plugins entry of type "snapshot"
// dials.
func NewServer(sn snapshots.Snapshotter) *grpc.Server {
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	return srv
}
