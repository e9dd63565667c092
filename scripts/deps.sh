#!/usr/bin/env bash
# Installs the Debian packages boxd's tests, demo and benchmarks use, if missing.
set -euo pipefail
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" || { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi
