#!/bin/sh
# scripts/ci-run-example.sh - a CI job on a throwaway fork of a warm box,
# for any CI system that can run a shell script on a host with a boxd daemon.
#
# Usage: scripts/ci-run-example.sh refresh   # once a day, or when the lock file changes
#        scripts/ci-run-example.sh test [N]  # every pipeline: N shards in parallel (default 4)
#
# The warm box (BOXD_WARM, default ci-warm) holds the toolchain, the
# checked-out project, its downloaded dependencies and a hot build cache.
# `refresh` makes it the first time (BOXD_IMAGE, default debian-bookworm)
# and moves it forward with --promote: the update runs in a fork, and only
# if it succeeds does the fork become the warm box (its state before stays
# as a snapshot, for `boxd create --from` should it be needed). `test` runs
# the shards, each in its own fork of it, with a log and a JUnit report per
# shard copied out to ARTIFACTS (default ./artifacts); the forks are
# removed whatever happens, a cancelled job included (the CI runner's
# SIGTERM), and the script exits with the shards' status: 0 only if all
# passed. The project's commands below (REPO, make deps, make test) are
# examples.
set -eu

warm=${BOXD_WARM:-ci-warm}
image=${BOXD_IMAGE:-debian-bookworm}
artifacts=${ARTIFACTS:-./artifacts}
repo=${REPO:-https://example.com/project.git}
rev=${CI_COMMIT_SHA:-HEAD}

case "${1:-}" in
refresh)
	if ! boxd ls --json | grep -q "\"name\": \"$warm\""; then
		boxd create "$warm" --image "$image" --memory 2G --cpus 2
		boxd exec "$warm" -- sh -c "apt-get update && apt-get install -y git make gcc && git clone $repo /src && cd /src && make deps"
	fi
	# The update runs in a fork; the warm box changes only if it succeeds.
	boxd run --fork-of "$warm" --promote --timeout 30m -- \
		sh -c "cd /src && git fetch -q && git checkout -q origin/HEAD && make deps && make build"
	# An idle warm box costs no memory: forks are made from its snapshot.
	boxd hibernate "$warm"
	;;
test)
	shards=${2:-4}
	mkdir -p "$artifacts"
	# {i} is each fork's index, 1 to N. --keep-on-failure would keep a
	# failed shard's fork for a look (boxd ssh NAME; boxd rm NAME after).
	exec boxd run --fork-of "$warm" --count "$shards" --timeout 20m \
		--name-prefix "ci-${CI_JOB_ID:-$$}" \
		--logs "$artifacts/logs" \
		--copy-out "/src/report.xml:$artifacts/report-{i}.xml" \
		--env "SHARD={i}" --env "SHARDS=$shards" \
		-- sh -c "cd /src && git fetch -q && git checkout -q $rev && make test SHARD={i} SHARDS=$shards REPORT=/src/report.xml"
	;;
*)
	echo "usage: $0 refresh | test [N]" >&2
	exit 2
	;;
esac
