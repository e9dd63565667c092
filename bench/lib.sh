# bench/lib.sh - sourced by the bench scripts (guest.sh, frontdoor.sh, run.sh, metrics.sh), not run:
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

# build_boxd: make build, and BOXD_AGENT names the agent it built unless
# it is set.
build_boxd() {
	make --no-print-directory build >&2
	export BOXD_AGENT=${BOXD_AGENT:-$REPO_ROOT/bin/boxd-agent}
}
