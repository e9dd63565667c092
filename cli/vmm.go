package cli

import (
	kvmrunner "github.com/boxd-dev/boxd/runner/kvm"
	"github.com/urfave/cli/v2"
)

// vmmCommand is the VMM process the kvm runner starts for each machine; it
// talks on the socket the runner passes as descriptor 3.
func vmmCommand() *cli.Command {
	return &cli.Command{
		Name:   "vmm",
		Usage:  "run one VM for the kvm runner (started by boxd, not by hand)",
		Hidden: true,
		Action: func(*cli.Context) error { return kvmrunner.ServeInherited() },
	}
}
