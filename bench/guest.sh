#!/usr/bin/env bash
# bench/guest.sh - boot, exec, snapshot, resume and fork Linux boxes under
# QEMU with boxd's qemu runner and agent, beside QEMU's bare boot of the same
# kernel and a host exec, all measured in one run, and print them side by
# side.
#
# Usage: bench/guest.sh [-json] [-reps N] [-execs N] [-mem MIB] [-cpus N]
#                       [-root DIR] [-cache DIR] [-agent FILE] [-kernel FILE]
#
#   -json      the results as one JSON object on stdout (progress on stderr)
#   -reps N    how many times each boot, snapshot, resume and fork runs
#              (default 3)
#   -execs N   exec round trips of `true` (default 50)
#   -mem MIB   guest memory (default 512)
#   -root DIR  boxd root kept between runs: the store with the image, the
#              kernel and the caches (default /var/tmp/boxd-bench-guest,
#              BOXD_BENCH_GUEST_ROOT)
#   -cache DIR where the debootstrap-bookworm tree is (default
#              /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# Builds bin/boxd and bin/boxd-agent (make build) and runs
# `go run ./bench/guestboot` from the repository root; see
# bench/guestboot/README.md. Needs root; installs Debian's qemu-system-x86,
# qemu-utils and busybox-static if they are missing. The first run fetches
# the cloud kernel and builds the image (about a minute); a run measures for
# about 45 seconds on 2 cores under TCG.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /bin/busybox ] && ! file -L /bin/busybox 2>/dev/null | grep -q 'dynamically linked' || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" != 0 ]; then
	echo "guest.sh: ${need[*]} missing and only root can install them" >&2
	exit 1
fi
install_debs "${need[@]}"

build_boxd
exec go run ./bench/guestboot "$@"
