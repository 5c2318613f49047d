#!/usr/bin/env bash
# Runs every test: builds (once, cached) what the tests need, starts a private control plane on
# loopback, runs `cargo test`, and stops the control plane again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export STASH_CLUSTER_DIR="${TMPDIR:-/tmp}/stash-test-cluster-$$"
trap 'tests/cluster/cluster.sh down' EXIT
eval "$(tests/cluster/cluster.sh up)"
# Benches are load targets, not tests (clippy --all-targets in .ci/run compiles them).
cargo test --lib --bins --tests --no-fail-fast "$@"
