#!/usr/bin/env bash
# bench/containerd.sh - containers in boxes against runc, side by side in
# one run, on the same image and snapshotter (boxd's), under Debian's
# containerd 1.6: `ctr run --rm` of true end to end and the time to a
# container's first output (boxd's shim, io.containerd.boxd.v2, against
# io.containerd.runc.v2); and crictl runp, create and start of a busybox
# container to its first log line (runtime handler boxd against runc).
# The measurements are subtests of integration/shim_test.go and
# integration/cri_test.go, which run them only under this script.
#
# Usage: sudo bench/containerd.sh
set -euo pipefail
case "${1:-}" in
-h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
"") ;;
*) echo "bench/containerd.sh: unknown argument $1" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export BOXD_BENCH_CONTAINERD=1
go test -count=1 -v -timeout 40m -run 'TestShim$/ctr_run_against_runc|TestCRI$/first_log_line_against_runc' ./integration/ |
	grep -v -E '^(=== |    --- |--- )|: (Debian rootfs|default image)'
