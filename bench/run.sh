#!/usr/bin/env bash
# bench/run.sh - CI jobs on throwaway forks of a warm box (boxd run) beside
# the same jobs on cold boxes (boxd create, the same setup, the job), in
# one run, printed side by side.
#
# Usage: bench/run.sh [-json] [-mem SIZE] [-files N] [-hold S] [-dir DIR]
#                     [-cache DIR]
#
#   -json       the results as one JSON object on stdout (progress on
#               stderr)
#   -mem SIZE   each box's memory (default 256M)
#   -files N    the setup's project: N files of 64 KiB, "built" into one
#               checksum (default 400)
#   -hold S     seconds each job sleeps after its output, while host memory
#               is measured (default 15)
#   -dir DIR    kept folder: the boxd root and the daemon's log (default
#               /var/tmp/boxd-bench-run, BOXD_BENCH_RUN_DIR)
#   -cache DIR  where the debootstrap-bookworm tree is (default
#               /var/cache/boxd-test, BOXD_TEST_CACHE)
#
# The setup (what the warm box did once, and what each cold box does) makes
# a project folder and builds it; the job prints a first line, then reads
# the build and prints a result. Measured, from the command's start:
# the time to the job's first line of output and to its end, for
# `boxd run --fork-of warm` with 1 and 4 jobs, and for 1 and 4 cold boxes
# (create, setup and job, the 4 in parallel); and the host memory of 4 jobs
# at once in forks and in cold boxes: the summed PSS of the root's QEMU
# processes, and the drop of MemAvailable, each less what was there before
# (the warm box and its spares; for the cold boxes, which are never
# forked, the daemon is restarted with --warm-forks 0). Needs root; builds
# bin/boxd (make build) and the debian-bookworm image from the cached
# debootstrap tree. Every box is
# removed and the daemon stopped at the end, on an error or ^C too.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
help_if_asked "$@"

json=0 mem=256M files=400 hold=15
dir=${BOXD_BENCH_RUN_DIR:-/var/tmp/boxd-bench-run}
cache=${BOXD_TEST_CACHE:-/var/cache/boxd-test}
while [ $# -gt 0 ]; do
	case "$1" in
	-json | --json) json=1 ;;
	-mem | --mem) mem=$2 && shift ;;
	-files | --files) files=$2 && shift ;;
	-hold | --hold) hold=$2 && shift ;;
	-dir | --dir) dir=$2 && shift ;;
	-cache | --cache) cache=$2 && shift ;;
	*) echo "run.sh: unknown argument $1 (see --help)" >&2 && exit 2 ;;
	esac
	shift
done

if [ "$(id -u)" != 0 ]; then
	echo "run.sh: needs root (the daemon runs QEMU with guest memory in /dev/shm)" >&2
	exit 1
fi
need=()
need_box_debs
command -v pgrep >/dev/null || need+=(procps)
install_debs "${need[@]}"
build_boxd
boxd=$REPO_ROOT/bin/boxd
dir=$(realpath -m "$dir")
root=$dir/root
mkdir -p "$root"
log() { echo "run.sh: $*" >&2; }

if ! "$boxd" --root "$root" image ls | grep -q '^debian-bookworm'; then
	[ -d "$cache/debootstrap-bookworm" ] || {
		echo "run.sh: no debootstrap tree in $cache (make test or make demo caches one)" >&2
		exit 1
	}
	log "building the image from $cache/debootstrap-bookworm"
	"$boxd" --root "$root" image build --tree "$cache/debootstrap-bookworm" >&2
fi

daemon=
cleanup() {
	rc=$?
	if [ -n "$daemon" ]; then
		for b in $("$boxd" --root "$root" ls --json 2>/dev/null | sed -n 's/^ *"name": "\(.*\)",$/\1/p'); do
			"$boxd" --root "$root" rm "$b" >/dev/null 2>&1 || true
		done
		kill -TERM "$daemon" 2>/dev/null || true
		wait "$daemon" 2>/dev/null || true
	fi
	left=$(pgrep -f -- "qemu-system-x86_64 .*$root/" || true)
	if [ -n "$left" ]; then
		echo "run.sh: QEMU left running, killing: $(echo $left)" >&2
		for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_daemon [ARG...]: the daemon of the root, with ARGs.
start_daemon() {
	"$boxd" --root "$root" daemon --ssh-listen 127.0.0.1:0 --idle-hibernate 0 "$@" >>"$dir/daemon.log" 2>&1 &
	daemon=$!
	for _ in $(seq 100); do
		[ -S "$root/boxd.sock" ] && "$boxd" --root "$root" ls >/dev/null 2>&1 && break
		sleep 0.1
	done
}
: >"$dir/daemon.log"
start_daemon
bx() { "$boxd" --root "$root" "$@"; }

setup="mkdir -p /root/proj/src /root/proj/build && cd /root/proj && i=0 && while [ \$i -lt $files ]; do head -c 65536 /dev/urandom > src/\$i; i=\$((i+1)); done && cat src/* | sha256sum > build/out"
job="echo job {i} starting; cut -c1-16 /root/proj/build/out; echo job {i} done"
holdjob="$job; echo job {i} holding; sleep $hold"

now() { date +%s.%N; }
# timed OUT T0 CMD...: runs CMD with its output (both streams) to OUT, and
# appends to OUT.t the seconds from T0 to its first line and to its end.
timed() {
	local out=$1 t0=$2 first=
	shift 2
	while IFS= read -r line; do
		[ -n "$first" ] || first=$(now)
		echo "$line" >>"$out"
	done < <("$@" 2>&1)
	echo "$(awk -v a="$t0" -v b="${first:-0}" 'BEGIN{printf "%.3f", (b>0?b-a:-1)}') $(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}')" >>"$out.t"
}
# first/end of the .t files given: the earliest first line, the latest end.
span() { cat "$@" | awk 'NR==1{f=$1;e=$2} {if($1<f)f=$1; if($2>e)e=$2} END{printf "%.2f %.2f\n", f, e}'; }

pss() {
	local t=0 v
	for pid in $(pgrep -f -- "qemu-system-x86_64 .*$root/" || true); do
		v=$(awk '/^Pss:/{print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)
		t=$((t + ${v:-0}))
	done
	echo "$t"
}
avail() { awk '/^MemAvailable:/{print $2}' /proc/meminfo; }
settle() { sleep 3; }

work=$dir/work
rm -rf "$work" && mkdir -p "$work"

log "warm box: create, setup once"
t0=$(now)
bx create warm --image debian-bookworm --memory "$mem" >/dev/null
bx exec warm -- sh -c "$setup"
warm_s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}')
settle
base_pss=$(pss) base_avail=$(avail)

log "boxd run --count 1"
timed "$work/run1" "$(now)" bx run --fork-of warm --name-prefix r1 -- sh -c "$job"
read -r run1_first run1_end < <(span "$work/run1.t")

log "boxd run --count 4"
timed "$work/run4" "$(now)" bx run --fork-of warm --count 4 --name-prefix r4 -- sh -c "$job"
read -r run4_first run4_end < <(span "$work/run4.t")
settle

log "boxd run --count 4, host memory while the jobs hold"
timed "$work/run4m" "$(now)" bx run --fork-of warm --count 4 --name-prefix m4 -- sh -c "$holdjob" &
runpid=$!
while [ "$(cat "$work/run4m" 2>/dev/null | grep -c holding || true)" -lt 4 ]; do sleep 0.2; done
sleep 2
run4_pss=$(($(pss) - base_pss)) run4_avail=$((base_avail - $(avail)))
wait "$runpid"
settle

cold() { # cold NAME: create, setup, job
	bx create "$1" --image debian-bookworm --memory "$mem" >/dev/null &&
		bx exec "$1" -- sh -c "$setup" >/dev/null &&
		bx exec "$1" -- sh -c "${job//\{i\}/${1#cold}}"
}
# Cold boxes are never forked: the daemon keeps no spares for them (it
# hibernates the warm box as it stops).
kill -TERM "$daemon" && wait "$daemon"
start_daemon --warm-forks 0
settle
base_pss=$(pss) base_avail=$(avail)

log "cold box: create, setup, job"
timed "$work/cold1" "$(now)" cold cold1
read -r cold1_first cold1_end < <(span "$work/cold1.t")
bx rm cold1 >/dev/null
settle

log "4 cold boxes at once (host memory once their jobs are done)"
t0=$(now)
pids=()
for i in 1 2 3 4; do
	timed "$work/cold4-$i" "$t0" cold "cold$i" &
	pids+=($!)
done
wait "${pids[@]}"
read -r cold4_first cold4_end < <(span "$work"/cold4-*.t)
sleep 2
cold4_pss=$(($(pss) - base_pss)) cold4_avail=$((base_avail - $(avail)))
for i in 1 2 3 4; do bx rm "cold$i" >/dev/null; done

mib() { awk -v k="$1" 'BEGIN{printf "%.0f", k/1024}'; }
if [ "$json" = 1 ]; then
	cat <<EOF
{"memory": "$mem", "setup_files": $files, "warm_create_and_setup_s": $warm_s,
 "run_1": {"first_line_s": $run1_first, "end_s": $run1_end},
 "run_4": {"first_line_s": $run4_first, "end_s": $run4_end, "pss_mib": $(mib "$run4_pss"), "memavailable_drop_mib": $(mib "$run4_avail")},
 "cold_1": {"first_line_s": $cold1_first, "end_s": $cold1_end},
 "cold_4": {"first_line_s": $cold4_first, "end_s": $cold4_end, "pss_mib": $(mib "$cold4_pss"), "memavailable_drop_mib": $(mib "$cold4_avail")}}
EOF
	exit 0
fi
printf '\nboxd run on forks of a warm box vs cold boxes (%s each; setup: %s files, done once by the warm box in %ss)\n\n' "$mem" "$files" "$warm_s"
printf '%-28s %14s %14s\n' "" "boxd run" "cold create"
printf '%-28s %13ss %13ss\n' "1 job: first line" "$run1_first" "$cold1_first"
printf '%-28s %13ss %13ss\n' "1 job: end" "$run1_end" "$cold1_end"
printf '%-28s %13ss %13ss\n' "4 jobs: first line" "$run4_first" "$cold4_first"
printf '%-28s %13ss %13ss\n' "4 jobs: end (all)" "$run4_end" "$cold4_end"
printf '%-28s %11s MiB %10s MiB\n' "4 jobs: QEMU PSS" "$(mib "$run4_pss")" "$(mib "$cold4_pss")"
printf '%-28s %11s MiB %10s MiB\n' "4 jobs: MemAvailable drop" "$(mib "$run4_avail")" "$(mib "$cold4_avail")"
