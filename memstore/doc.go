// Package memstore keeps guest memory in boxd's store and brings it back
// lazily: Capture writes a region's pages (all of them, or only those a dirty
// bitmap names) as a memory block map of a snapshot; Restore registers a
// region with userfaultfd and fills each page from the snapshot the first
// time it is touched, a window of pages at a time, after populating the
// working set recorded by the previous restore.
//
// Vocabulary:
//
//   - Region: guest RAM as seen by the process that owns it, page-aligned.
//   - Page table: page number → chunk id and pack location, resolved once per
//     restore so that serving a fault costs no index lookup.
//   - Fault-around: a fault is answered with up to FaultAround contiguous
//     missing pages, because waking the faulting thread costs more than
//     copying a few more pages.
//   - Read-ahead: while faults come in order, the handler reads the missing
//     pages after each window from the store in one go, checked against
//     their chunk ids, and serves the next faults from them; only faulting
//     windows are copied in.
//   - Working set: the pages faulted during a restore, in order. It is kept
//     with the snapshot and prefetched, in large batches, by the next restore
//     of that snapshot or of a descendant.
//   - Overlay: pages held in host memory over a map in the store (a
//     snapshot's changed pages while it is on its way to the store), served
//     before the map.
//   - Tables: page tables kept from earlier restores, or derived from a
//     parent's, so that restoring the same snapshot again resolves nothing.
//
// memstore knows no VMM: the kvm runner registers its guest memory in
// process (Restore), and a VMM in another process hands its userfaultfd over
// a unix socket (SendHandoff, ReceiveHandoff, Serve), as Firecracker's
// page-fault handler protocol does.
package memstore
