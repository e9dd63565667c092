// Package cas is boxd's content-addressed chunk store: every disk block and
// guest memory page lives here once, whatever box or snapshot holds it.
//
// Vocabulary:
//
//   - Chunk: 4 KiB of data, addressed by the SHA-256 of its raw bytes (an [ID]).
//     The all-zero chunk has an id ([ZeroID]) but is never stored.
//   - Pack: an append-only file of chunks, closed by a footer that lists every
//     chunk, so the index can be rebuilt from packs alone. A sealed pack is
//     immutable. A Writer compresses each chunk on its own with s2 (or stores it
//     raw when that saves little): fast, so a snapshot is durable soon.
//   - Frame: in a pack that compaction wrote, up to 255 chunks compressed
//     together as one zstd frame: slower to write, much smaller. Reading a
//     chunk decodes its frame (the last few decoded are kept).
//   - Compaction: rewriting the packs Writers sealed into packs of frames, off
//     the ingest path ([Store.Compact], `boxd store compact`, or the daemon in
//     a quiet spell), so that a snapshot is small soon after.
//   - Index: chunk id → location (pack, offset, lengths, codec), kept in a bbolt
//     database beside the packs. It is a cache of the pack footers: when it is
//     missing or damaged, [Open] rebuilds it from them.
//
// On disk, under the store's directory:
//
//	index.db              bbolt: bucket "chunks" (id → location), "packs" (pack → state), "meta"
//	packs/pack-%08x.pack  sealed packs
//	packs/*.tmp           a pack being written; removed on open (never indexed)
//
// Write order is the crash-safety argument: a pack is written to a temporary
// file, fsynced, renamed and its folder fsynced; only then do its chunks enter
// the index; only after that may a snapshot refer to them. Garbage collection
// writes the new pack first, then switches the index, then deletes the old
// pack; compaction follows the same order. A crash at any point leaves, at
// worst, unreferenced chunks that the next GC reclaims.
//
// One Writer at a time (ingest, GC) runs beside any number of readers. Every
// read re-hashes the chunk it returns, so a damaged chunk is an error, never
// wrong bytes.
package cas
