#!/usr/bin/env bash
# bench/inside.sh - a fork of a box made from inside it (`box fork`, in a
# script boxd exec runs) beside one made from the host (`boxd fork`), on
# the same box in the same run, printed side by side.
#
# Usage: bench/inside.sh [-json] [-reps N] [-warm-ups N] [-mem SIZE]
#                        [-dir DIR] [-cache DIR]
#
#   -json        the results as one JSON object on stdout (progress on
#                stderr)
#   -reps N      forks of each kind timed, alternating (default 5)
#   -warm-ups N  untimed forks of each kind first (default 1)
#   -mem SIZE    the box's memory (default 256M)
#   -dir DIR     kept folder: the boxd root and the daemon's log (default
#                /var/tmp/boxd-bench-inside, BOXD_BENCH_INSIDE_DIR)
#   -cache DIR   where the debootstrap-bookworm tree is (default
#                /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# Builds bin/boxd and bin/boxd-agent (make build) and the program in
# bench/inside/, and runs it; see bench/README.md. Needs root; installs
# Debian's procps and what boxes need (QEMU, debootstrap, passt, nftables:
# need_box_debs in lib.sh) if they are missing. The
# first run builds the image (seconds from a cached debootstrap tree) and
# fetches the kernel; a run with the defaults takes about a minute on 2
# cores under TCG. The boxes are removed, the daemon stopped, and no QEMU
# of the root is left, on an error or ^C too.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

if [ "$(id -u)" != 0 ]; then
	echo "inside.sh: needs root (the daemon runs QEMU with guest memory in /dev/shm)" >&2
	exit 1
fi

need=()
need_box_debs
command -v pgrep >/dev/null || need+=(procps)
install_debs "${need[@]}"

build_boxd
export BOXD=${BOXD:-$REPO_ROOT/bin/boxd}

run_box_program inside "${BOXD_BENCH_INSIDE_DIR:-/var/tmp/boxd-bench-inside}" "$@"
