#!/usr/bin/env bash
# bench/metrics.sh - what serving Prometheus metrics costs `boxd fork` and
# `boxd resume`: the same box under a daemon without --metrics-listen and
# under one with it, scraped every second, in alternating phases of one
# run, printed side by side.
#
# Usage: bench/metrics.sh [-json] [-reps N] [-rounds N] [-warm-ups N]
#                         [-scrape-every D] [-bound PCT] [-mem SIZE]
#                         [-dir DIR] [-cache DIR]
#
#   -json            the results as one JSON object on stdout (progress on
#                    stderr)
#   -reps N          forks and resumes timed in each phase (default 10)
#   -rounds N        rounds, each a phase without metrics (A) then one
#                    with metrics scraped (B) (default 6)
#   -warm-ups N      untimed forks and resumes first in each phase
#                    (default 1)
#   -scrape-every D  how often phase B GETs /metrics (default 1s)
#   -bound PCT       the overhead the run is judged against, in percent of
#                    the p50 without metrics (default 2)
#   -mem SIZE        the box's memory (default 256M)
#   -dir DIR         kept folder: the boxd root and the daemon's log
#                    (default /var/tmp/boxd-bench-metrics,
#                    BOXD_BENCH_METRICS_DIR)
#   -cache DIR       where the debootstrap-bookworm tree is (default
#                    /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# Builds bin/boxd and bin/boxd-agent (make build) and the program in
# bench/metrics/, and runs it; see bench/README.md. Needs root; installs
# Debian's procps and what boxes need (QEMU, debootstrap, passt, nftables:
# need_box_debs in lib.sh) if they are missing. The
# first run builds the image (seconds from a cached debootstrap tree) and
# fetches the kernel; a run with the defaults takes about ten minutes on 2
# cores under TCG, more when other work shares the machine. The box is
# removed, the daemon stopped, and no QEMU of the root is left, on an error
# or ^C too.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

if [ "$(id -u)" != 0 ]; then
	echo "metrics.sh: needs root (the daemon runs QEMU with guest memory in /dev/shm)" >&2
	exit 1
fi

need=()
need_box_debs
command -v pgrep >/dev/null || need+=(procps)
install_debs "${need[@]}"

build_boxd
export BOXD=${BOXD:-$REPO_ROOT/bin/boxd}

run_box_program metrics "${BOXD_BENCH_METRICS_DIR:-/var/tmp/boxd-bench-metrics}" "$@"
