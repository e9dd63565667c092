package qemu

// This file holds the life of a QEMU machine's memory files in one place;
// the code that moves a file between the states is named in it.

// Guest memory of a QEMU machine is a file in Runner.MemDir (a tmpfs),
// mapped by QEMU as memory-backend-file: shared (share=on) by the one
// machine that writes it, or copy-on-write (share=off) by machines that
// must not change it. A file is in one of four states, and a spare is a
// QEMU waiting on one:
//
//   - own: the memory of one machine, mapped shared and written by its
//     guest. Start makes one (QEMU creates it); Restore with
//     RestoreOptions.LongLived makes one too (ownMemory) and fills it with
//     the snapshot's memory, from the snapshot's frozen file when there is
//     one, else from the store, while QEMU starts: QEMU does not touch a
//     shared file until the guest runs. The file goes when its machine
//     stops, unless Freeze made it frozen.
//   - prepared: the file a machine's next SnapshotForFork fills, made
//     ahead by StartSpares (or by SnapshotForFork itself when there is
//     none): an empty sparse file for a machine on an own file, a sparse
//     copy of the frozen file it maps for a machine that is itself a
//     restore. A machine has at most one; the runner lists them
//     (prepFiles) until a fork adopts or drops them. It goes when the fork
//     fails or when the machine stops before forking (dropPrepared).
//   - frozen: a snapshot's memory that no process writes again. Restores of
//     the snapshot map it copy-on-write, so that pages they only read are in
//     host memory once. It is counted (frozenFile.refs: machines mapping it,
//     plus an own file being copied from it) and goes (maybeDrop) once no
//     machine maps it, it is done (its last machine stopped, or
//     ReleaseSnapshot or SnapshotRemoved was called) and it is not pending;
//     its spares go with it. It comes from SnapshotForFork (the prepared
//     file, adopted), from Freeze of a machine on an own file (that file,
//     adopted) and from Restore when the snapshot has none (acquire: rebuilt
//     from the store, zero pages left as holes; restores that start together
//     wait for one rebuild and share it).
//   - pending: a frozen file whose snapshot is not in the store yet
//     (pendingSnap). SnapshotForFork, and Freeze of a machine on an own
//     file whose disk is not raw, return before the snapshot is written;
//     it is written in the background (adoptPending). Meanwhile restores
//     read its device state from memory and the file stays, also when the
//     write fails; the next snapshot that builds on it, Committed and
//     Flush write it again.
//
// A spare is a paused QEMU (-S -incoming defer, no disk) that StartSpares
// starts on a prepared file, mapped copy-on-write; it reads nothing of
// the file before it runs, so it sees what SnapshotForFork writes there.
// Once the fork adopts the file, a Restore of the fork's snapshot takes a
// spare (takeSpare) instead of starting QEMU: the disk is plugged in at
// its fixed PCI slot, the console moved, the device state loaded. The
// spare then holds that restore's reference on the frozen file. Spares
// no restore takes are stopped by ReleaseSnapshot, by the frozen file
// going, by a failed fork, or by their machine stopping before it
// forked. StartMoveSpares starts spares on a machine's own file instead,
// for a Freeze that makes that file frozen: they stop with the machine if
// it ends otherwise. A spare that ends untaken removes its file if that
// file is neither frozen, nor prepared, nor a running machine's own
// (removeUnused).
//
// The states and what moves a file between them:
//
//	  Start     Restore (LongLived): filled from the frozen file or the store
//	    |          |
//	    v          v
//	  +--------------+  Stop
//	  |     own      |-------------------------------------------> removed
//	  +--------------+
//	    |         |
//	    | Freeze  | Freeze, raw disk (stored before Freeze returns)
//	    |         +--------------------------------+
//	    v                                          v
//	  +------------------+  written to the store +--------+
//	  | frozen + pending |---------------------->| frozen |<---- Restore, when the snapshot
//	  +------------------+                       +--------+      has no file: rebuilt from
//	    ^                                          |             the store
//	    | SnapshotForFork                          | no machine maps it, and done
//	    | (live copy, or precopy,                  | (its last machine's Stop,
//	    |  stop, catch up)                         | ReleaseSnapshot, SnapshotRemoved)
//	  +----------+                                 v
//	  | prepared |                               removed
//	  +----------+
//	    ^     | a failed fork, or its machine ends before it forks
//	    |     +---------------------------------------------------> removed
//	  StartSpares (or SnapshotForFork, when none is prepared)
//
//	  StartSpares --> spare (maps the prepared file; after the fork, the frozen one)
//	                    | Restore of the fork's snapshot takes it
//	                    v
//	                  a restored machine on the frozen file (one reference)
//
// Restore maps a frozen file, pending or not, copy-on-write and counts one
// more reference; that machine's Stop gives it back. Adopt (adopt.go) of
// machines that a process now gone restored counts their references on
// its frozen file anew (holdFrozen): the file is done from the start and
// goes when the last of them stops. Own files of adopted machines stay
// own files; the gone process's prepared files and spares are reclaimed. Freeze here means a
// machine on an own file whose disk is qcow2, or that has none; Freeze of
// a machine on a frozen file stores the snapshot before it returns and
// adopts no file.
//
// SnapshotForFork of a running machine on a frozen file, or on an own file
// that is mostly data, of a runner with LiveForks, copies its memory into
// the prepared file live, with QEMU's dirty tracking (livecopy.go).
// Otherwise, for a machine on an own
// file, it copies that file into the prepared one while the guest runs
// (precopy), stops the guest, and writes the pages that changed since
// (catchUp); for a machine on a frozen file, the prepared file is already a
// copy of that file and only the pages the machine holds privately (found
// in /proc/PID/pagemap) are written (writePrivate). Either way the machine continues on its own
// memory. A machine whose disk is raw cannot fork this way: its
// SnapshotForFork is a Snapshot, stored before it returns, and restores
// rebuild memory from the store.

// frozenFile is the runner's record of one frozen file.
type frozenFile struct {
	snap string
	path string
	refs int // machines mapping it
	// pending is the snapshot's capture until it is in the store: the file
	// stays until then (also when writing it failed, for the next try).
	pending *pendingSnap
	// done says nobody will start a machine on the file unasked: the last
	// machine mapping it stopped, or dropFrozen was called (ReleaseSnapshot,
	// SnapshotRemoved). The file goes
	// once it is done, unmapped and written.
	done bool
}
