#!/usr/bin/env bash
# bench/kvm.sh - measure boxd's kvm runner: fork, hibernate, resume and the
# re-touch of a working set after a lazy restore, with QEMU's fork recipe
# measured beside fork in the same run.
#
# Usage: bench/kvm.sh [-benchtime Nx] [-bench REGEXP] [-count N]
#
#   -benchtime Nx  iterations of each benchmark (default 10x); p99 over N
#                  iterations is the slowest of them when N < 100
#   -bench REGEXP  which benchmarks (default: all of runner/kvm's)
#   -count N       repeat each benchmark N times (default 1)
#
# Builds boxd into a temporary folder for the VMM processes (BOXD_BENCH_VMM;
# set it to use another boxd binary) and runs
# `go test ./runner/kvm/ -run '^$' -bench ...` from the repository root; the
# benchmarks are described in runner/kvm/bench_test.go and bench/README.md.
# Needs root, /dev/kvm and gcc (the guest is built with it);
# installs Debian's qemu-system-x86 if qemu-system-x86_64 is missing. A run
# with the defaults takes about five minutes on 2 cores, most of it the guest
# writing memory between the timed parts.
set -euo pipefail

BENCHTIME=10x
BENCH=.
COUNT=1
while [ $# -gt 0 ]; do
	case "$1" in
	-benchtime)
		BENCHTIME=${2:?-benchtime needs a value}
		shift 2
		;;
	-bench)
		BENCH=${2:?-bench needs a value}
		shift 2
		;;
	-count)
		COUNT=${2:?-count needs a value}
		shift 2
		;;
	-h | --help)
		sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "kvm.sh: unknown argument: $1 (try --help)" >&2
		exit 2
		;;
	esac
done

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO_ROOT"

if ! command -v qemu-system-x86_64 >/dev/null; then
	if [ "$(id -u)" != 0 ]; then
		echo "kvm.sh: qemu-system-x86_64 is missing and only root can install it (apt-get install qemu-system-x86)" >&2
		exit 1
	fi
	echo "installing Debian's qemu-system-x86" >&2
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null 2>&1; then
		apt-get update -q >/dev/null
		apt-get install -y -q --no-install-recommends qemu-system-x86 >/dev/null
	fi
fi

if [ -z "${BOXD_BENCH_VMM:-}" ]; then
	BUILD=$(mktemp -d)
	trap 'rm -rf -- "$BUILD"' EXIT
	go build -o "$BUILD/boxd" ./cmd/boxd
	export BOXD_BENCH_VMM=$BUILD/boxd
fi
[ -x "$BOXD_BENCH_VMM" ] || {
	echo "kvm.sh: BOXD_BENCH_VMM=$BOXD_BENCH_VMM is not an executable" >&2
	exit 1
}

echo "vmm: $BOXD_BENCH_VMM vmm"
echo "qemu: $(qemu-system-x86_64 --version | head -n 1)"
echo "kvm: $(if grep -qw -e vmx -e svm /proc/cpuinfo; then echo hardware virtualisation; else echo no vmx/svm: guests run slowly; fi)"
echo "cpus: $(nproc); store: $(df -T "${TMPDIR:-/tmp}" | awk 'NR==2{print $2 " on " $1}') (${TMPDIR:-/tmp})"
go test ./runner/kvm/ -run '^$' -bench "$BENCH" -benchtime "$BENCHTIME" -count "$COUNT" -timeout 60m
