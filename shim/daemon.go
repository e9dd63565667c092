package shim

import (
	"os"
	"path/filepath"

	"github.com/boxd-dev/boxd/daemon"
)

// DefaultRoot is the boxd root whose daemon the shim uses when the
// environment names none.
const DefaultRoot = "/var/lib/boxd"

// DaemonRoot returns the root of the boxd daemon the shim uses, from the
// environment it inherits from containerd: BOXD_ROOT, else the folder of
// BOXD_SOCKET (ROOT/boxd.sock), else DefaultRoot.
func DaemonRoot() string {
	if root := os.Getenv("BOXD_ROOT"); root != "" {
		return root
	}
	if sock := os.Getenv("BOXD_SOCKET"); sock != "" {
		return filepath.Dir(sock)
	}
	return DefaultRoot
}

// DaemonBoxes returns the client of the daemon of DaemonRoot.
func DaemonBoxes() (Boxes, error) { return daemon.NewClient(DaemonRoot()), nil }
