#!/usr/bin/env bash
# The store demo: ingest a real ext4 image, ingest a changed copy of it, and
# print the dedup report. Runs on boxd's defaults in a throw-away root.
set -euo pipefail
cd "$(dirname "$0")/.."
boxd=${BOXD:-./bin/boxd}
work=${BOXD_DEMO_DIR:-/var/tmp/boxd-demo}
root="$work/root"
rm -rf "$work"
mkdir -p "$work/tree"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building a 256 MiB ext4 image from /usr/share/doc and /usr/share/man (mkfs.ext4 -d)"
cp -a /usr/share/doc /usr/share/man "$work/tree/" 2>/dev/null || true
truncate -s 256M "$work/base.img"
mkfs.ext4 -q -F -d "$work/tree" "$work/base.img"

step "ingesting it as snapshot 'base'"
"$boxd" --root "$root" store ingest --name base "$work/base.img"

step "changing 1% of the copy's blocks and ingesting it as 'changed' (parent: base)"
cp "$work/base.img" "$work/changed.img"
python3 - "$work/changed.img" <<'PY'
import os, random, sys
path = sys.argv[1]
blocks = os.path.getsize(path) // 4096
rng = random.Random(1)
with open(path, "r+b") as f:
    for n in rng.sample(range(blocks), blocks // 100):
        f.seek(n * 4096)
        f.write(rng.randbytes(4096))
PY
"$boxd" --root "$root" store ingest --name changed --parent base "$work/changed.img"

step "the snapshots"
"$boxd" --root "$root" store ls

step "the dedup report"
"$boxd" --root "$root" store report

step "exporting 'changed' and comparing it with its source"
"$boxd" --root "$root" store export changed "$work/changed.out"
cmp "$work/changed.img" "$work/changed.out" && echo "byte-identical"

step "verifying every stored chunk"
"$boxd" --root "$root" store verify

printf '\nThe store is in %s; try: %s --root %s store report --json\n' "$root" "$boxd" "$root"
