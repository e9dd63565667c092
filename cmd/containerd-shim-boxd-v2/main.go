// Command containerd-shim-boxd-v2 is boxd's containerd runtime v2 shim
// (runtime io.containerd.boxd.v2): each container runs in a box of the
// boxd daemon (see package shim).
package main

import (
	"os"

	"github.com/boxd-dev/boxd/shim"
)

func main() { os.Exit(shim.Main(os.Args[1:], shim.DaemonBoxes)) }
