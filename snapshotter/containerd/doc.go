// Package containerd is containerd's snapshotter (core/snapshots.Snapshotter
// of containerd v2) on boxd's snapshot graph and chunk store. `boxd
// snapshotter` serves it over containerd's snapshots gRPC API.
//
// # Shape
//
// Every active or view snapshot is an ext4 filesystem in an image file that
// the host mounts with a loop device; Mounts returns
//
//	{Type: "ext4", Source: <root>/images/<id>, Options: ["loop"]}  // active
//	{Type: "ext4", Source: <root>/images/<id>, Options: ["loop", "ro"]} // view
//
// A committed snapshot has no file: it is a snapshot of boxd's graph, named
// <prefix><id> ("ctd-<id>" by default), whose block map MapName holds the
// filesystem image.
//
//   - Prepare and View over a parent export the parent's block map into the
//     new image sparsely: blocks that are zero stay holes, so the file takes
//     the room of the parent's non-zero blocks only. Without a parent the
//     image is a fresh sparse file formatted by mkfs.ext4, of the size the
//     label containerd.io/snapshot/max-size asks for (bytes, rounded up to
//     4 KiB) or the configured default (WithDefaultSize; 1 GiB); its
//     lost+found is removed (containerd expects an empty root). An image
//     made from a parent keeps the parent's size.
//   - Commit reads only the allocated parts of the image (SEEK_DATA), writes
//     the blocks that differ from the parent's into the store
//     (deduplicated: a block the store holds is not stored again) and records
//     them as a delta against the parent's graph snapshot. A parent block
//     that became a hole becomes a zero block. The image file is removed.
//   - Remove deletes containerd's record, then the graph snapshot or the
//     image file. Removing a snapshot that has children is refused
//     (errdefs.ErrFailedPrecondition).
//   - Cleanup (containerd's GC hook, snapshots.Cleaner) removes what a crash
//     may have left behind (graph snapshots and image files no record refers
//     to), then runs the store's garbage collection, which deletes the
//     chunks no snapshot references.
//   - Usage is the size of the snapshot's non-zero blocks that differ from
//     its parent's: measured at Commit for a committed snapshot, computed
//     from the image for an active one, zero for a view. Inodes are not
//     counted.
//
// containerd's own records (keys, parents, kinds, labels, usage) live in
// containerd's storage.MetaStore, a bbolt file, metadata.db, under the
// snapshotter's root, so snapshots, labels and usage survive a restart.
//
// # Crash safety
//
// Prepare, View, Commit, Remove and Cleanup each run inside one write
// transaction of the MetaStore, so they are serialised with each other. A
// snapshot's files are made before its record commits, and removed after:
//
//   - Commit writes the graph snapshot first (a graph commit is atomic by
//     itself: the chunks are durable before the snapshot's record is
//     written), then commits the MetaStore transaction that turns the active
//     record into a committed one, then deletes the image. A kill -9 before
//     the transaction commits leaves the active snapshot as it was, image
//     and all, and a graph snapshot no record refers to; a kill -9 after it
//     leaves the committed snapshot and an image file no record refers to.
//     Never a half of each. Cleanup removes the leftovers; a Commit retried
//     on the same active snapshot replaces the graph snapshot a crashed one
//     left.
//   - Prepare and View write the image under a temporary name and rename it
//     into place before the record commits.
//   - Remove commits the record's deletion first, then deletes the graph
//     snapshot or the image.
//
// # Mounts without a loop device
//
// Snapshotter.SnapshotForSource maps the Source of a mount back to its
// snapshot (the image is <root>/images/<id>, and the id is containerd's
// snapshot id in the MetaStore). It returns the image path, a raw disk image
// a VMM can attach as it is, and Base, the graph snapshot whose MapName map
// the image began as. A view's image never changes, so a view is Base's block
// map byte for byte, which can be read from the store (as memstore does for
// memory) instead of the file; an active image's writes are in the file, over
// Base. Nothing is passed through mount options: ext4 rejects options it
// does not know.
package containerd
