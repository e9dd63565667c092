// Package cas is boxd's content-addressed chunk store: every disk block and
// guest memory page lives here once, whatever box or snapshot holds it.
//
// Vocabulary:
//
//   - Chunk: 4 KiB of data, addressed by the SHA-256 of its raw bytes (an [ID]).
//     The all-zero chunk has an id ([ZeroID]) but is never stored. A Writer
//     reading a sparse file takes the chunks in its holes for zero chunks
//     without reading them (the file system says where the data is).
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
//   - Index: chunk id → location (pack, offset, stored length, codec, and for a
//     chunk of a frame its slot and the frame's chunk count), kept in index
//     segments: immutable files of sorted entries, one written for each sealed
//     pack and merged in the background. It is a cache of the pack footers: a
//     segment missing or damaged is rebuilt from them by [Open].
//
// On disk, under the store's directory:
//
//	lock                  held (flock) by the process that has the store open
//	index.db              bbolt: bucket "packs" (pack → state, chunks, size), "meta"
//	index/seg-%016x.idx   index segments (format in segment.go)
//	index/*.tmp           a segment being written; removed on open
//	packs/pack-%08x.pack  sealed packs
//	packs/*.tmp           a pack being written; removed on open (never indexed)
//
// Write order is the crash-safety argument: a pack is written to a temporary
// file (its writeback to disk started as it grows, which makes nothing
// durable by itself), fsynced, renamed and its folder fsynced; only then is its index
// segment written the same way, and then its record in index.db; only after
// that may a snapshot refer to its chunks. Garbage collection writes the new
// packs and their segment first, then switches index.db (new packs live,
// old ones dead), then deletes the old packs; compaction follows the same
// order. A merge of segments renames its output into place before it
// removes its inputs. A crash at any point leaves, at worst, unreferenced
// chunks that the next GC reclaims, or a pack or segment that the next Open
// records, rebuilds or removes.
//
// One Writer at a time (ingest, GC) runs beside any number of readers. Every
// read re-hashes the chunk it returns, so a damaged chunk is an error, never
// wrong bytes.
package cas
