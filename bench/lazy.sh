#!/usr/bin/env bash
# bench/lazy.sh - boxd's lazy restores beside its eager ones
# (boxd daemon --eager-restore), in alternating phases of one run: a
# hibernated box's resume until its vCPUs run and until its agent answers,
# `ssh BOX true` that wakes it through boxd's SSH front door, a resume of
# the box hibernated while an upload streamed into it, a 2 GiB box
# that touched 1 GiB against one that touched 100 MiB, and the host memory
# of a resumed box a minute later, printed side by side with their goals.
#
# Usage: bench/lazy.sh [-json] [-rounds N] [-reps N] [-idle D] [-mem SIZE]
#                      [-fill MIB] [-big-mem SIZE] [-touch-big MIB]
#                      [-touch-small MIB] [-upload MIB] [-dir DIR]
#                      [-cache DIR]
#
#   -json             the results as one JSON object on stdout (progress on
#                     stderr)
#   -rounds N         rounds, each a lazy phase then an eager one (default 2)
#   -reps N           timed resumes and wakes of each kind in each phase
#                     (default 3)
#   -idle D           how long resumed boxes idle before their host memory
#                     is read (default 1m)
#   -mem SIZE         the measured box's memory (default 512M)
#   -fill MIB         what it writes to a file and reads back (default 256)
#   -big-mem SIZE     the memory of the two boxes compared (default 2G)
#   -touch-big MIB    random data the one writes into a tmpfs (default 1024)
#   -touch-small MIB  random data the other writes (default 100)
#   -upload MIB       what streams into the measured box while it hibernates
#                     and resumes, for the busy resume's row (default 24;
#                     0: no such row)
#   -dir DIR          kept folder: the boxd root and the daemon's log
#                     (default /var/tmp/boxd-bench-lazy, BOXD_BENCH_LAZY_DIR)
#   -cache DIR        where the debootstrap-bookworm tree is (default
#                     /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# Builds bin/boxd and bin/boxd-agent (make build) and the program in
# bench/lazy/, and runs it; see bench/README.md. Needs root; installs
# Debian's openssh-client, procps and what boxes need (QEMU, debootstrap,
# passt, nftables: need_box_debs in lib.sh) if they are missing. The first
# run builds the image (seconds from a cached debootstrap tree) and fetches
# the kernel; a run with the defaults takes
# about 15 to 20 minutes on 2 cores under TCG with other work on them. At
# most three boxes (512 MiB, 2 GiB, 2 GiB) run at once. Every box is
# removed, the daemon stopped, and no QEMU of the root is left, on an error
# or ^C too.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

if [ "$(id -u)" != 0 ]; then
	echo "lazy.sh: needs root (the daemon runs QEMU with guest memory in /dev/shm; the bench reads QEMU's smaps_rollup)" >&2
	exit 1
fi

need=()
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
need_box_debs
command -v pgrep >/dev/null || need+=(procps)
install_debs "${need[@]}"

build_boxd
export BOXD=${BOXD:-$REPO_ROOT/bin/boxd}

run_box_program lazy "${BOXD_BENCH_LAZY_DIR:-/var/tmp/boxd-bench-lazy}" "$@"
