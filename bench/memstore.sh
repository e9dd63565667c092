#!/usr/bin/env bash
# bench/memstore.sh - measure boxd's guest-memory restore and capture
# (memstore) against a C userfaultfd baseline and a plain copy.
#
# Usage: bench/memstore.sh [-json] [-reps N] [-baseline FILE]
#
# Builds and runs ./bench/memstore from the repository root; see
# bench/memstore/README.md. Needs root, gcc and taskset.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO_ROOT"
exec go run ./bench/memstore "$@"
