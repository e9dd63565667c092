// Package remote keeps boxd's chunk store and snapshots in an S3-compatible
// bucket, so that a box hibernated on one host resumes on another.
//
// Vocabulary (see package cas and snapshotter for chunk, pack and snapshot):
//
//   - Bucket: the object store, seen through the narrow [Bucket] interface;
//     [S3] implements it on the S3 API.
//   - Remote pack: a sealed local pack uploaded byte for byte, named by the
//     SHA-256 of its bytes, so an upload is create-only and idempotent.
//   - Index segment: one remote pack's footer (chunk id → offset, lengths,
//     codec), so a reader knows where each chunk lies without reading packs.
//   - Manifest: one snapshot's record and block-map deltas (see
//     snapshotter.Manifest), with the root's path taken out of its labels.
//   - Box object: a hibernated box's record and the snapshot it resumes from.
//   - Lease: the object that says which host owns a box; it is taken with a
//     create-only write, so of two hosts resuming a box at once one wins.
//
// In the bucket, under the prefix:
//
//	packs/HEX.pack        remote packs (HEX: SHA-256 of the pack's bytes)
//	index/HEX.idx         index segments: "BOXDSEG1" | pack size u64 LE | the pack's footer and trailer
//	snapshots/NAME.json   manifests
//	boxes/NAME.json       box objects
//	leases/NAME.json      leases
//
// Write order is the consistency argument, as it is in the local store:
// packs, then their index segments, then the manifests that name their
// chunks (parents before children), then the box object. Packs, segments and
// manifests are written with If-None-Match: * and never change, so a push
// killed at any point leaves objects that nothing refers to yet, or that
// the next push finds in place (its create is refused, which it takes as
// done), and a reader never finds a reference to something missing.
//
// Reading is lazy per snapshot chain, not per page: a pull fetches the chunks
// the chain names that the local store lacks, by range reads of spans of
// remote packs (neighbouring chunks merged into one request), checks each
// chunk against its id on arrival, and stores it locally; damaged bytes are
// an errdefs.ErrDataLoss error and never reach the store. The local store is
// the cache.
//
// The S3 client is aws-sdk-go-v2 rather than minio-go: it reads the
// standard AWS configuration as is (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_REGION, AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3, the shared config and
// credentials files and their profiles), and it sends conditional writes
// (If-None-Match) as typed fields.
package remote
