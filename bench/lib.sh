# bench/lib.sh - sourced by the bench scripts (guest.sh, frontdoor.sh, run.sh, metrics.sh, inside.sh), not run:
# goes to the repository root (REPO_ROOT) and defines what they do before
# they start their program.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

# help_if_asked ARG...: when the first ARG is -h or --help, prints the
# opening comment of the script that sourced this file and exits.
help_if_asked() {
	case "${1:-}" in
	-h | --help)
		sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	esac
}

# install_debs PACKAGE...: installs the Debian packages named (none:
# nothing to do), quietly; the package lists are updated only when the
# install fails without.
install_debs() {
	[ $# -gt 0 ] || return 0
	echo "installing Debian's $*" >&2
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
		apt-get update -q >/dev/null
		apt-get install -y -q --no-install-recommends "$@" >/dev/null
	fi
}

# need_box_debs: adds to the caller's need array the Debian packages that a
# daemon's real boxes need and this host lacks: QEMU, debootstrap and
# mkfs.ext4 for the image, passt for a box's network and nftables for the
# table that keeps boxes off the host.
need_box_debs() {
	command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
	command -v qemu-img >/dev/null || need+=(qemu-utils)
	command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
	command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || need+=(e2fsprogs)
	command -v passt >/dev/null || need+=(passt)
	command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
}

# build_boxd: make build, and BOXD_AGENT names the agent it built unless
# it is set.
build_boxd() {
	make --no-print-directory build >&2
	export BOXD_AGENT=${BOXD_AGENT:-$REPO_ROOT/bin/boxd-agent}
}

# run_box_program NAME DEFAULT_DIR ARG...: builds the Go program in
# bench/NAME and runs it with ARG.... The program works in a kept folder
# (its -dir flag, else DEFAULT_DIR) whose root's QEMUs and daemon it stops
# itself, on errors and signals too; this is the backstop should it die:
# every QEMU of DIR/root, and its daemon, are killed by pid, and the script
# then fails. Exits with the program's status (130 on ^C, 143 on SIGTERM).
run_box_program() {
	prog=$1 dir=$2
	shift 2
	local args=("$@") i
	for i in "${!args[@]}"; do
		case "${args[$i]}" in
		-dir | --dir) dir=${args[$((i + 1))]:-$dir} ;;
		-dir=* | --dir=*) dir=${args[$i]#*=} ;;
		esac
	done
	dir=$(realpath -m "$dir")
	tmp=$(mktemp -d)
	child=
	trap box_program_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	go build -o "$tmp/$prog" "./bench/$prog"
	"$tmp/$prog" "$@" &
	child=$!
	wait "$child"
}

# box_program_cleanup is run_box_program's exit trap.
box_program_cleanup() {
	rc=$?
	if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
		kill -TERM "$child" 2>/dev/null || true
		wait "$child" 2>/dev/null || true
	fi
	left=$(pgrep -f -- "qemu-system-x86_64 .*$dir/root/|--root $dir/root daemon" || true)
	if [ -n "$left" ]; then
		echo "$prog.sh: left running, killing: ${left//$'\n'/ }" >&2
		for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
		rc=1
	fi
	rm -rf "$tmp"
	exit "$rc"
}
