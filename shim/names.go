package shim

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
)

// The labels of a container's box: containerd's names for it.
const (
	LabelNamespace = "containerd.namespace"
	LabelID        = "containerd.id"
	// LabelRuntime marks a box the shim made.
	LabelRuntime = "containerd.runtime"
)

// RuntimeName is the runtime's name in containerd.
const RuntimeName = "io.containerd.boxd.v2"

// Agent ids of the task's processes in its box.
const (
	InitProcess = "init"
	ExecPrefix  = "exec-"
)

// BoxName returns the box of container id in namespace ns: a readable
// prefix of both and a hash of the pair, so two containers never share a
// box and the name is always valid (box.ValidateName).
func BoxName(ns, id string) string {
	sum := sha256.Sum256([]byte(ns + "/" + id))
	hash := hex.EncodeToString(sum[:])[:12]
	var b strings.Builder
	dash := true // no leading dash, no two in a row
	for _, r := range strings.ToLower(ns + "-" + id) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
			dash = false
		case !dash:
			b.WriteByte('-')
			dash = true
		}
	}
	// "ctr-" + readable + "-" + hash stays within 63.
	readable := strings.Trim(b.String(), "-")
	if max := 63 - len("ctr-") - 1 - len(hash); len(readable) > max {
		readable = strings.TrimRight(readable[:max], "-")
	}
	if readable == "" {
		return "ctr-" + hash
	}
	return "ctr-" + readable + "-" + hash
}

// Labels returns the labels of container id's box in namespace ns.
func Labels(ns, id string) map[string]string {
	return map[string]string{LabelNamespace: ns, LabelID: id, LabelRuntime: RuntimeName}
}
