#!/usr/bin/env bash
# bench/snapshotter.sh - unpack the same Debian image with boxd's containerd
# snapshotter and containerd's native, overlayfs and blockfile snapshotters,
# in-process through containerd's Go API, and print them side by side.
#
# Usage: bench/snapshotter.sh [-json] [-cpuprofile FILE] [-snapshotters LIST]
#                             [-image-size BYTES] [-dir DIR] [-cache DIR] [-mirror URL]
#
# Runs `go run ./bench/snapshotter` from the repository root; see
# bench/snapshotter/README.md. Needs root and e2fsprogs; installs Debian's
# debootstrap the first time if it is missing.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO_ROOT"

go run ./bench/snapshotter "$@"
