#!/usr/bin/env bash
# bench/store.sh - measure boxd's content-addressed store against sha256sum,
# restic and cp on a real 1 GiB ext4 disk image. boxd's stored bytes are
# shown twice: right after ingest (s2 packs) and after `boxd store compact`
# (zstd packs), with the compaction's time.
#
# Usage: bench/store.sh [--json] [--keep] [--help]
#
#   --json   print the summary as one JSON object on stdout (progress goes to stderr)
#   --keep   keep the work folder on exit and reuse its disk images on the next run
#            (stores and repositories are always rebuilt from scratch)
#
# Environment:
#   BOXD              boxd binary (default: <repo>/bin/boxd, built if missing)
#   BOXD_BENCH_DIR    work folder (default: /var/tmp/boxd-bench)
#   BOXD_BENCH_SEED   seed for the 1% block changes (default: 42)
#
# Needs root (loop mount), mkfs.ext4, python3, sha256sum, cmp; installs
# Debian's restic if it is missing.
set -euo pipefail

JSON=0
KEEP=0
for arg in "$@"; do
	case "$arg" in
	--json) JSON=1 ;;
	--keep) KEEP=1 ;;
	-h | --help)
		sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "store.sh: unknown argument: $arg (try --help)" >&2
		exit 2
		;;
	esac
done

# Progress goes to stdout, or to stderr when stdout carries the JSON summary.
log() {
	if [ "$JSON" = 1 ]; then printf '%s\n' "$*" >&2; else printf '%s\n' "$*"; fi
}
die() {
	echo "store.sh: $*" >&2
	exit 1
}

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${BOXD_BENCH_DIR:-/var/tmp/boxd-bench}
SEED=${BOXD_BENCH_SEED:-42}
IMG_SIZE=1G
FILL_TARGET=80 # stop filling once the filesystem is this % full ...
FILL_CAP=85    # ... and never copy an entry that would push it past this
CHANGE_FRAC=0.01

[ "$(id -u)" = 0 ] || die "must run as root (it loop-mounts an ext4 image)"
case "$W" in
/?*) ;;
*) die "BOXD_BENCH_DIR must be an absolute path other than /: '$W'" ;;
esac
W=${W%/}
for tool in mkfs.ext4 mount umount mountpoint python3 sha256sum cmp du truncate; do
	command -v "$tool" >/dev/null || die "missing tool: $tool"
done

# ---------------------------------------------------------------- boxd binary
if [ -n "${BOXD:-}" ]; then
	[ -x "$BOXD" ] || die "BOXD=$BOXD is not an executable"
else
	BOXD=$REPO_ROOT/bin/boxd
	if [ ! -x "$BOXD" ]; then
		log "building $BOXD"
		if [ -f "$REPO_ROOT/Makefile" ] && make -C "$REPO_ROOT" -n build >/dev/null 2>&1; then
			make -C "$REPO_ROOT" build >&2
		else
			(cd "$REPO_ROOT" && go build -o bin/boxd ./cmd/boxd) >&2
		fi
		[ -x "$BOXD" ] || die "build did not produce $BOXD"
	fi
fi

# ---------------------------------------------------------------- restic
if ! command -v restic >/dev/null; then
	log "installing restic"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q restic >/dev/null 2>&1; then
		apt-get update -q >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q restic >/dev/null
	fi
fi
RESTIC_VERSION=$(restic version | awk '{print $2; exit}')
RESTIC_BACKUP_FLAGS=(--quiet --host boxd-bench)
if restic backup --help 2>/dev/null | grep -q -- '--no-scan'; then
	RESTIC_BACKUP_FLAGS+=(--no-scan)
fi
export RESTIC_PASSWORD=bench

# ---------------------------------------------------------------- work folder
MARK=.boxd-bench
if [ -e "$W" ] && [ ! -e "$W/$MARK" ] && [ -n "$(ls -A "$W" 2>/dev/null)" ]; then
	die "$W exists, is not empty and was not made by this script; set BOXD_BENCH_DIR"
fi
mkdir -p "$W"
touch "$W/$MARK"

IMG=$W/disk.img
IMG2=$W/disk-changed.img
MNT=$W/mnt
ROOT=$W/boxd-root
REPO=$W/restic-repo
RCACHE=$W/restic-cache
EXPORT=$W/export.img
COPY=$W/cp.img
LOGF=$W/log

cleanup() {
	local rc=$?
	if mountpoint -q "$MNT" 2>/dev/null; then
		umount "$MNT" 2>/dev/null || umount -l "$MNT" || true
	fi
	if [ "$KEEP" = 1 ]; then
		log "kept $W (--keep)"
	else
		rm -rf -- "$W"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fresh stores every run; images only survive with --keep.
rm -rf -- "$ROOT" "$REPO" "$RCACHE" "$EXPORT" "$COPY" "$MNT"
if [ "$KEEP" = 0 ] || [ ! -e "$W/images.ok" ]; then
	rm -f -- "$IMG" "$IMG2" "$W/images.ok"
fi
: >"$LOGF"

# ---------------------------------------------------------------- helpers
now() { date +%s.%N; }
# timed CMD...: runs CMD, sets ELAPSED (seconds, wall clock)
timed() {
	local t0 t1
	t0=$(now)
	"$@"
	t1=$(now)
	ELAPSED=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
}
# run CMD... with its output in the log, shown only on failure
quiet() {
	if ! "$@" >>"$LOGF" 2>&1; then
		tail -n 30 "$LOGF" >&2
		die "failed: $*"
	fi
}
mbps() { awk -v b="$1" -v s="$2" 'BEGIN{ if (s > 0) printf "%.1f", b/1e6/s; else print 0 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print 0 }'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1048576}'; }
bytes_of() { du -sb "$1" | cut -f1; }
# jget FILE KEY[.KEY...]: one field of a JSON document
jget() {
	python3 -c '
import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"
}

# ---------------------------------------------------------------- 1. the image
build_image() {
	log "== building a $IMG_SIZE ext4 image from /usr (fill target ${FILL_TARGET}%)"
	truncate -s "$IMG_SIZE" "$IMG"
	mkfs.ext4 -q -F "$IMG"
	mkdir -p "$MNT"
	mount -o loop "$IMG" "$MNT"
	local size used src dst e esz stop=0
	size=$(df -B1 --output=size "$MNT" | tail -n 1 | tr -d ' ')
	shopt -s nullglob
	for src in /usr/lib/x86_64-linux-gnu /usr/share /usr/lib; do
		[ -d "$src" ] || continue
		dst=$MNT/$(echo "${src#/usr/}" | tr / _)
		mkdir -p "$dst"
		for e in "$src"/*; do
			used=$(df -B1 --output=used "$MNT" | tail -n 1 | tr -d ' ')
			if [ $((used * 100)) -ge $((size * FILL_TARGET)) ]; then
				stop=1
				break
			fi
			[ "$e" = /usr/lib/x86_64-linux-gnu ] && continue # copied already
			[ -e "$dst/$(basename "$e")" ] && continue
			esz=$(du -sb "$e" 2>/dev/null | head -n 1 | cut -f1) || true
			[ $(((used + ${esz:-0}) * 100)) -gt $((size * FILL_CAP)) ] && continue
			cp -a "$e" "$dst/" 2>/dev/null || true # a full filesystem is fine
		done
		[ "$stop" = 1 ] && break
	done
	shopt -u nullglob
	sync
	used=$(df -B1 --output=used "$MNT" | tail -n 1 | tr -d ' ')
	umount "$MNT"
	rmdir "$MNT"
	echo "$used $size" >"$W/fill"
}

change_blocks() { # change_blocks FILE SEED FRACTION -> prints blocks changed
	python3 - "$@" <<'PY'
import os, random, sys
path, seed, frac = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
bs = 4096
n = os.path.getsize(path) // bs
k = max(1, round(n * frac))
rng = random.Random(seed)
blocks = sorted(rng.sample(range(n), k))
fd = os.open(path, os.O_WRONLY)
try:
    for b in blocks:
        os.pwrite(fd, rng.randbytes(bs), b * bs)
finally:
    os.close(fd)
print(k)
PY
}

if [ -e "$W/images.ok" ]; then
	log "== reusing images in $W (--keep)"
else
	build_image
	log "== copying the image and overwriting ${CHANGE_FRAC} of its 4 KiB blocks (seed $SEED)"
	cp "$IMG" "$IMG2"
	change_blocks "$IMG2" "$SEED" "$CHANGE_FRAC" >"$W/changed"
	sync
	touch "$W/images.ok"
fi
IMG_BYTES=$(stat -c %s "$IMG")
read -r FS_USED FS_SIZE <"$W/fill"
FILL_PCT=$(awk -v u="$FS_USED" -v s="$FS_SIZE" 'BEGIN{printf "%.1f", 100*u/s}')
CHANGED=$(cat "$W/changed")
IMG_ALLOC=$(du -B1 "$IMG" | cut -f1)
log "image: $IMG_BYTES bytes, filesystem ${FILL_PCT}% full ($(mib "$FS_USED") MiB used), $(mib "$IMG_ALLOC") MiB allocated"
log "changed copy: $CHANGED random 4 KiB blocks overwritten with random bytes"
log "boxd: $BOXD"
log "restic: $RESTIC_VERSION, backup flags: ${RESTIC_BACKUP_FLAGS[*]}"
log "CPUs: $(nproc), work folder: $W ($(df -T "$W" | awk 'NR==2{print $2}'))"
log ""
log "Page cache is not dropped: each image is read once (cat > /dev/null) before it is"
log "measured, so every tool reads it warm. 'sync' runs (untimed) before each timed step,"
log "so no tool pays for another's writeback; no timed step syncs on its own behalf."
log "Times are wall clock (date +%s.%N); MB/s = image bytes / 1e6 / seconds."
log ""

# ---------------------------------------------------------------- 2. first image
cat "$IMG" >/dev/null

log "== ingest of the image"
sync
timed sha256sum "$IMG" >/dev/null
SHA_S=$ELAPSED
SHA_MBPS=$(mbps "$IMG_BYTES" "$SHA_S")
log "$(printf '  %-10s %8.3f s %9s MB/s' sha256sum "$SHA_S" "$SHA_MBPS")"

sync
timed "$BOXD" --root "$ROOT" store ingest --json --name img --kind disk "$IMG" >"$W/ingest1.json"
BOXD1_S=$ELAPSED
BOXD1_MBPS=$(mbps "$IMG_BYTES" "$BOXD1_S")
BOXD1_SELF=$(printf '%.1f' "$(jget "$W/ingest1.json" mb_per_s)")
log "$(printf '  %-10s %8.3f s %9s MB/s   (boxd reports %s MB/s)' boxd "$BOXD1_S" "$BOXD1_MBPS" "$BOXD1_SELF")"

quiet restic --cache-dir "$RCACHE" init --repo "$REPO"
sync
timed quiet restic -r "$REPO" --cache-dir "$RCACHE" backup "${RESTIC_BACKUP_FLAGS[@]}" "$IMG"
RESTIC1_S=$ELAPSED
RESTIC1_MBPS=$(mbps "$IMG_BYTES" "$RESTIC1_S")
log "$(printf '  %-10s %8.3f s %9s MB/s' restic "$RESTIC1_S" "$RESTIC1_MBPS")"

BOXD1_PACKS=$(bytes_of "$ROOT/cas/packs")
BOXD1_ROOT=$(bytes_of "$ROOT")
"$BOXD" --root "$ROOT" store report --json >"$W/report1.json"
BOXD1_STORED=$(jget "$W/report1.json" stored_bytes)
RESTIC1_REPO=$(bytes_of "$REPO")
log "== stored bytes, image alone"
log "  boxd packs (du -sb cas/packs) $BOXD1_PACKS ($(mib "$BOXD1_PACKS") MiB); report stored_bytes $BOXD1_STORED; whole root $BOXD1_ROOT"
log "  restic repo (du -sb)          $RESTIC1_REPO ($(mib "$RESTIC1_REPO") MiB)"

sync
timed "$BOXD" --root "$ROOT" store compact --json >"$W/compact1.json"
COMPACT1_S=$ELAPSED
BOXD1_CPACKS=$(bytes_of "$ROOT/cas/packs")
log "== compaction after the image"
log "$(printf '  %-10s %8.3f s   boxd packs %s (%s MiB)' compact "$COMPACT1_S" "$BOXD1_CPACKS" "$(mib "$BOXD1_CPACKS")")"

# ---------------------------------------------------------------- 3. changed copy
cat "$IMG2" >/dev/null
log "== ingest of the copy with $CHANGED blocks changed"
sync
timed "$BOXD" --root "$ROOT" store ingest --json --name img-changed --parent img --kind disk "$IMG2" >"$W/ingest2.json"
BOXD2_S=$ELAPSED
BOXD2_MBPS=$(mbps "$IMG_BYTES" "$BOXD2_S")
BOXD2_SELF=$(printf '%.1f' "$(jget "$W/ingest2.json" mb_per_s)")
BOXD2_NEW=$(jget "$W/ingest2.json" new_bytes)
log "$(printf '  %-10s %8.3f s %9s MB/s   (boxd reports %s MB/s, %s new bytes, --parent img)' boxd "$BOXD2_S" "$BOXD2_MBPS" "$BOXD2_SELF" "$BOXD2_NEW")"

sync
timed quiet restic -r "$REPO" --cache-dir "$RCACHE" backup "${RESTIC_BACKUP_FLAGS[@]}" "$IMG2"
RESTIC2_S=$ELAPSED
RESTIC2_MBPS=$(mbps "$IMG_BYTES" "$RESTIC2_S")
log "$(printf '  %-10s %8.3f s %9s MB/s' restic "$RESTIC2_S" "$RESTIC2_MBPS")"

BOXD2_PACKS=$(bytes_of "$ROOT/cas/packs")
BOXD2_ROOT=$(bytes_of "$ROOT")
"$BOXD" --root "$ROOT" store report --json >"$W/report2.json"
BOXD2_STORED=$(jget "$W/report2.json" stored_bytes)
RESTIC2_REPO=$(bytes_of "$REPO")
log "== stored bytes, image + changed copy (the image compacted, the copy not yet)"
log "  boxd packs (du -sb cas/packs) $BOXD2_PACKS ($(mib "$BOXD2_PACKS") MiB); report stored_bytes $BOXD2_STORED; whole root $BOXD2_ROOT"
log "  restic repo (du -sb)          $RESTIC2_REPO ($(mib "$RESTIC2_REPO") MiB)"

sync
timed "$BOXD" --root "$ROOT" store compact --json >"$W/compact2.json"
COMPACT2_S=$ELAPSED
BOXD2_CPACKS=$(bytes_of "$ROOT/cas/packs")
log "== compaction after the changed copy"
log "$(printf '  %-10s %8.3f s   boxd packs %s (%s MiB)' compact "$COMPACT2_S" "$BOXD2_CPACKS" "$(mib "$BOXD2_CPACKS")")"

# ---------------------------------------------------------------- 4. export
log "== export of the first image"
rm -f "$EXPORT" "$COPY"
sync
timed cp "$IMG" "$COPY"
CP_S=$ELAPSED
CP_MBPS=$(mbps "$IMG_BYTES" "$CP_S")
log "$(printf '  %-10s %8.3f s %9s MB/s' cp "$CP_S" "$CP_MBPS")"
sync
timed "$BOXD" --root "$ROOT" store export --json img "$EXPORT" >"$W/export.json"
EXP_S=$ELAPSED
EXP_MBPS=$(mbps "$IMG_BYTES" "$EXP_S")
EXP_SELF=$(printf '%.1f' "$(jget "$W/export.json" mb_per_s)")
log "$(printf '  %-10s %8.3f s %9s MB/s   (boxd reports %s MB/s)' boxd "$EXP_S" "$EXP_MBPS" "$EXP_SELF")"
if ! cmp -s "$IMG" "$EXPORT"; then
	cmp "$IMG" "$EXPORT" >&2 || true
	die "EXPORT MISMATCH: boxd store export of 'img' is not byte-identical to the image"
fi
log "  cmp: export is byte-identical to the image"
rm -f "$EXPORT" "$COPY"
log ""

# ---------------------------------------------------------------- 5. summary
R_SHA=$(ratio "$BOXD1_MBPS" "$SHA_MBPS")
R_RESTIC=$(ratio "$BOXD1_MBPS" "$RESTIC1_MBPS")
R_RESTIC2=$(ratio "$BOXD2_MBPS" "$RESTIC2_MBPS")
R_ST1=$(ratio "$BOXD1_PACKS" "$RESTIC1_REPO")
R_ST2=$(ratio "$BOXD2_PACKS" "$RESTIC2_REPO")
R_CST1=$(ratio "$BOXD1_CPACKS" "$RESTIC1_REPO")
R_CST2=$(ratio "$BOXD2_CPACKS" "$RESTIC2_REPO")
R_EXP=$(ratio "$EXP_MBPS" "$CP_MBPS")
met() { if awk "BEGIN{exit !($1)}"; then echo true; else echo false; fi; }
G1=$(met "$R_SHA >= 2")
G2=$(met "$R_RESTIC >= 3")
G3=$(met "$BOXD2_PACKS <= $RESTIC2_REPO")
G4=$(met "$BOXD1_CPACKS <= $RESTIC1_REPO")
G5=$(met "$BOXD2_CPACKS <= 0.6 * $RESTIC2_REPO")
yn() { if [ "$1" = true ]; then echo MET; else echo "NOT MET"; fi; }

if [ "$JSON" = 1 ]; then
	python3 - \
		image.bytes="$IMG_BYTES" image.fs_used_bytes="$FS_USED" image.fs_fill_pct="$FILL_PCT" \
		image.changed_blocks="$CHANGED" image.seed="$SEED" \
		versions.restic="\"$RESTIC_VERSION\"" cpus="$(nproc)" \
		ingest.sha256sum.seconds="$SHA_S" ingest.sha256sum.mb_per_s="$SHA_MBPS" \
		ingest.boxd.seconds="$BOXD1_S" ingest.boxd.mb_per_s="$BOXD1_MBPS" ingest.boxd.reported_mb_per_s="$BOXD1_SELF" \
		ingest.restic.seconds="$RESTIC1_S" ingest.restic.mb_per_s="$RESTIC1_MBPS" \
		ingest.boxd_vs_sha256sum="$R_SHA" ingest.boxd_vs_restic="$R_RESTIC" \
		ingest_changed.boxd.seconds="$BOXD2_S" ingest_changed.boxd.mb_per_s="$BOXD2_MBPS" \
		ingest_changed.boxd.reported_mb_per_s="$BOXD2_SELF" ingest_changed.boxd.new_bytes="$BOXD2_NEW" \
		ingest_changed.restic.seconds="$RESTIC2_S" ingest_changed.restic.mb_per_s="$RESTIC2_MBPS" \
		ingest_changed.boxd_vs_restic="$R_RESTIC2" \
		stored.image.boxd_pack_bytes="$BOXD1_PACKS" stored.image.boxd_stored_bytes="$BOXD1_STORED" \
		stored.image.boxd_root_bytes="$BOXD1_ROOT" stored.image.restic_repo_bytes="$RESTIC1_REPO" \
		stored.image.boxd_vs_restic="$R_ST1" \
		stored.pair.boxd_pack_bytes="$BOXD2_PACKS" stored.pair.boxd_stored_bytes="$BOXD2_STORED" \
		stored.pair.boxd_root_bytes="$BOXD2_ROOT" stored.pair.restic_repo_bytes="$RESTIC2_REPO" \
		stored.pair.boxd_vs_restic="$R_ST2" \
		compact.image.seconds="$COMPACT1_S" compact.image.boxd_pack_bytes="$BOXD1_CPACKS" \
		compact.image.boxd_vs_restic="$R_CST1" \
		compact.pair.seconds="$COMPACT2_S" compact.pair.boxd_pack_bytes="$BOXD2_CPACKS" \
		compact.pair.boxd_vs_restic="$R_CST2" \
		export.boxd.seconds="$EXP_S" export.boxd.mb_per_s="$EXP_MBPS" export.boxd.reported_mb_per_s="$EXP_SELF" \
		export.cp.seconds="$CP_S" export.cp.mb_per_s="$CP_MBPS" export.boxd_vs_cp="$R_EXP" \
		export.identical=true \
		goals.ingest_2x_sha256sum="$G1" goals.ingest_3x_restic="$G2" goals.pair_stored_le_restic="$G3" \
		goals.image_compacted_le_restic="$G4" goals.pair_compacted_le_0_6_restic="$G5" \
		<<'PY'
import json, sys
out = {}
for arg in sys.argv[1:]:
    key, _, val = arg.partition("=")
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = json.loads(val)
print(json.dumps(out, separators=(",", ":")))
PY
	exit 0
fi

row() { printf '%-34s %10s %10s %12s\n' "$@"; }
echo "=================================== summary ==================================="
echo "image: 1 GiB ext4, ${FILL_PCT}% full of /usr files; changed copy: $CHANGED of $((IMG_BYTES / 4096)) blocks"
echo
row "ingest (warm cache)" seconds MB/s "boxd is"
row "  boxd store ingest" "$BOXD1_S" "$BOXD1_MBPS" ""
row "  sha256sum" "$SHA_S" "$SHA_MBPS" "${R_SHA}x"
row "  restic backup" "$RESTIC1_S" "$RESTIC1_MBPS" "${R_RESTIC}x"
row "ingest of changed copy" "" "" ""
row "  boxd store ingest --parent" "$BOXD2_S" "$BOXD2_MBPS" ""
row "  restic backup" "$RESTIC2_S" "$RESTIC2_MBPS" "${R_RESTIC2}x"
echo
row "stored bytes" "boxd MiB" "restic MiB" "boxd/restic"
row "  image, after ingest" "$(mib "$BOXD1_PACKS")" "$(mib "$RESTIC1_REPO")" "$R_ST1"
row "  image, after compact" "$(mib "$BOXD1_CPACKS")" "$(mib "$RESTIC1_REPO")" "$R_CST1"
row "  + changed copy, after ingest" "$(mib "$BOXD2_PACKS")" "$(mib "$RESTIC2_REPO")" "$R_ST2"
row "  + changed copy, after compact" "$(mib "$BOXD2_CPACKS")" "$(mib "$RESTIC2_REPO")" "$R_CST2"
echo "  (boxd: du -sb ROOT/cas/packs; report stored_bytes $(mib "$BOXD1_STORED") / $(mib "$BOXD2_STORED") MiB"
echo "   before compaction; restic: du -sb REPO; the copy is ingested after the image's compaction)"
echo
row "compaction (boxd store compact)" seconds "" ""
row "  after the image" "$COMPACT1_S" "" ""
row "  after the changed copy" "$COMPACT2_S" "" ""
echo
row "export of the image" seconds MB/s "boxd is"
row "  boxd store export" "$EXP_S" "$EXP_MBPS" ""
row "  cp" "$CP_S" "$CP_MBPS" "${R_EXP}x"
echo "  export byte-identical (cmp): yes"
echo
echo "goals"
printf '  %-52s %s\n' "ingest >= 2x sha256sum     (is ${R_SHA}x)" "$(yn "$G1")"
printf '  %-52s %s\n' "ingest >= 3x restic        (is ${R_RESTIC}x)" "$(yn "$G2")"
printf '  %-52s %s\n' "stored bytes for the pair <= restic's (is ${R_ST2}x)" "$(yn "$G3")"
printf '  %-52s %s\n' "image compacted <= restic's   (is ${R_CST1}x)" "$(yn "$G4")"
printf '  %-52s %s\n' "pair compacted <= 0.6x restic's (is ${R_CST2}x)" "$(yn "$G5")"
