#!/usr/bin/env bash
# The box demo: start the daemon, build the default image through it, create
# a box and SSH into it. Runs on boxd's defaults in its own root; the daemon
# stops (hibernating the box) when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."
boxd=${BOXD:-$PWD/bin/boxd}
root=${BOXD_DEMO_DIR:-/var/tmp/boxd-demo}/root
port=${BOXD_DEMO_PORT:-2222}
export BOXD_AGENT=$PWD/bin/boxd-agent
mkdir -p "$root"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "starting boxd daemon (SSH front door on 127.0.0.1:$port; log in $root/daemon.log)"
"$boxd" --root "$root" daemon --ssh-listen "127.0.0.1:$port" >"$root/daemon.log" 2>&1 &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
# Until it answers (a socket a killed daemon left may be there already).
for _ in $(seq 300); do
	"$boxd" --root "$root" ls >/dev/null 2>&1 && break
	kill -0 $daemon 2>/dev/null || { echo "boxd daemon exited; its log:" >&2; cat "$root/daemon.log" >&2; exit 1; }
	sleep 0.1
done

step "building the default image through the daemon (debootstrap once, then cached under $root)"
"$boxd" --root "$root" image build
"$boxd" --root "$root" image ls

if ! "$boxd" --root "$root" ls | grep -q '^demo '; then
	step "creating box 'demo' (boots Linux under QEMU; TCG without vmx/svm takes a few seconds)"
	"$boxd" --root "$root" create demo
fi
"$boxd" --root "$root" ls

step "ssh demo@127.0.0.1 -p $port: a command"
"$boxd" --root "$root" ssh demo -- 'uname -a; grep PRETTY /etc/os-release; hostname; echo "hello from $(hostname)" > /root/hello'

step "forking it: boxd fork demo demo-2"
"$boxd" --root "$root" rm demo-2 >/dev/null 2>&1 || true
"$boxd" --root "$root" fork demo demo-2
"$boxd" --root "$root" ssh demo-2 -- 'hostname; cat /root/hello'
"$boxd" --root "$root" ls

if [ -t 0 ] && [ -t 1 ]; then
	step "a shell in box 'demo' (exit to end the demo)"
	"$boxd" --root "$root" ssh demo || true
fi
step "stopping the daemon: running boxes hibernate and come back on the next ssh"
