// Package snapshotter keeps boxd's snapshot graph: named, immutable
// snapshots, each with an optional parent and one or more block maps over
// the chunk store.
//
// Vocabulary:
//
//   - Block map: for one image (a disk or a memory region), block number →
//     chunk id, plus the image's logical size, so an export is byte-identical.
//     It is stored as a delta against the parent snapshot's map of the same
//     name: only the blocks that differ. A block that became zero is recorded
//     with cas.ZeroID; zero blocks of a snapshot without a parent take no room.
//   - Snapshot: a name, a parent, labels, creation time and its block maps.
//     Snapshots never change; removing one that has children is refused.
//   - Draft: a writable snapshot in the making. Blocks are written to it (the
//     chunks go to the store at once), then Commit makes it a snapshot.
//
// Metadata lives in a bbolt database, meta.db, beside the chunk store (cas/
// under the same root). A snapshot's record and its deltas are written in one
// transaction, after the chunks they name are durable in the store, so a
// crash leaves either the whole snapshot or none of it.
//
// Reading block n of a snapshot deep in a chain resolves the chain once into a
// flat, copy-on-write table (cached), so each read is O(1) whatever the depth.
package snapshotter
