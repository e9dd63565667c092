#!/usr/bin/env bash
# bench/remote.sh - the store in an S3 bucket: a push and a pull of a
# 256 MiB snapshot (a quarter of its chunks zero, the rest random) through
# a real S3 server on this host (versitygw, built once into the tools
# cache), beside whole-object reads of the same packs with the same client
# (each chunk checked; once not stored, once stored as a pull stores it).
# The resume of a box on another host beside one on the host that
# hibernated it is measured by integration/remote_test.go (TestRemote -v).
#
# Usage: bench/remote.sh [-runs N]
set -euo pipefail
runs=1
case "${1:-}" in
-runs) runs=$2 ;;
-h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
"") ;;
*) echo "bench/remote.sh: unknown argument $1" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
exec go test -count="$runs" -run '^$' -bench BenchmarkTransfer -benchtime 1x ./remote/
