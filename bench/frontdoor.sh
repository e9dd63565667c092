#!/usr/bin/env bash
# bench/frontdoor.sh - boxd's front door as a user meets it: the real
# OpenSSH client through boxd's SSH proxy and the boxd CLI through the
# daemon, beside baselines measured on this machine in the same run, and
# print them side by side.
#
# Usage: bench/frontdoor.sh [-json] [-reps N] [-wake-reps N] [-fork-reps N]
#                           [-upload MiB] [-upload-reps N]
#                           [-ls-reps N] [-boxes N] [-batch N] [-mem SIZE]
#                           [-many-mem SIZE] [-dir DIR] [-cache DIR]
#
#   -json          the results as one JSON object on stdout (progress on
#                  stderr)
#   -reps N        ssh `true` to the running box, to the baseline sshd and
#                  boxd exec, N times each (default 20)
#   -wake-reps N   ssh to the hibernated box (default 5)
#   -fork-reps N   boxd fork, fork --count 2 and cold creates (default 3)
#   -upload MiB    each upload's size: ssh `cat >/dev/null` to the box and
#                  to the baseline sshd, boxd exec while one runs, and the
#                  same size downloaded (default 64; 0: none)
#   -upload-reps N uploads of each kind (default 3)
#   -ls-reps N     each ls (default 10)
#   -boxes N       boxes for the big ls (default 100)
#   -batch N       forks made, then hibernated, at a time (default 10)
#   -mem SIZE      the measured box's memory (default 512M)
#   -many-mem SIZE the memory of the seed the many are forked from
#                  (default 128M)
#   -dir DIR       kept folder: the boxd root and the daemon's log (default
#                  /var/tmp/boxd-bench-frontdoor, BOXD_BENCH_FRONTDOOR_DIR)
#   -cache DIR     where the debootstrap-bookworm tree is (default
#                  /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# Builds bin/boxd and bin/boxd-agent (make build) and the program in
# bench/frontdoor/, and runs it; see bench/README.md. Needs root; installs
# Debian's openssh-client, openssh-server and what boxes need (QEMU,
# debootstrap, passt, nftables: need_box_debs in lib.sh) if they are missing (the sshd the package brings is not started: the
# baseline is a private one). The first run builds the image (seconds from
# a cached debootstrap tree) and fetches the kernel; a run takes about
# four minutes on 2 cores under TCG. Every box is removed, the daemon
# and the private sshd are stopped, and no QEMU of the root is left, on an
# error or ^C too.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

if [ "$(id -u)" != 0 ]; then
	echo "frontdoor.sh: needs root (the daemon runs QEMU with guest memory in /dev/shm; the baseline sshd logs in as root)" >&2
	exit 1
fi

need=()
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
need_box_debs
command -v pgrep >/dev/null || need+=(procps)
install_debs "${need[@]}"

build_boxd
export BOXD=${BOXD:-$REPO_ROOT/bin/boxd}

run_box_program frontdoor "${BOXD_BENCH_FRONTDOOR_DIR:-/var/tmp/boxd-bench-frontdoor}" "$@"
