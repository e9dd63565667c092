#!/usr/bin/env bash
# Installs the Debian packages boxd's tests, demo and benchmarks use, and
# those boxes need (QEMU, debootstrap for images, busybox-static), if missing.
set -euo pipefail
# Tools in sbin count even where the caller's PATH lacks it.
PATH="$PATH:/usr/sbin:/sbin"
need=()
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v python3 >/dev/null || need+=(python3)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v ssh >/dev/null || need+=(openssh-client)
# The operators' view test scrapes the daemon with a real Prometheus server.
command -v prometheus >/dev/null || need+=(prometheus)
# Boxes' networks: a passt process per machine, kept off the host by an
# nftables table.
command -v passt >/dev/null || need+=(passt)
command -v nft >/dev/null || need+=(nftables)
# The busybox package's binary is dynamic; an initramfs needs the static one.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
if [ "${#need[@]}" -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" || { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi
