// Package shim is boxd's containerd runtime v2 shim (io.containerd.boxd.v2):
// a task service, over ttrpc, that runs each container in a box of its own
// through the boxd daemon's API.
//
// Vocabulary:
//   - Container: what containerd names by namespace and id; its task is the
//     container's init process.
//   - Box: the micro-VM the container runs in, one per container, made from
//     the container's root file system (an ext4 image of boxd's containerd
//     snapshotter) and labelled with the namespace and id (LabelNamespace,
//     LabelID).
//   - Process: the init process or an exec of the task; each runs in the box
//     as a kept process of the agent (agent.ProcessSpec), named by its
//     agent id (InitProcess, or ExecPrefix and the exec id).
//   - Checkpoint: a snapshot of the box; the checkpoint folder containerd
//     hands over holds its name (CheckpointFile), which a later Create reads
//     to make a new box from it.
package shim
