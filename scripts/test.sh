#!/usr/bin/env bash
# Runs every test: builds (once, cached) what the tests need, starts a private cluster with this machine's
# one real node (cluster.sh up --node), runs `cargo test`, stops the cluster and checks that the node left
# nothing behind on the host. STASH_TEST_NODE=0 starts a control plane without a node instead (for a second
# run beside one that has the node: the node tests then say they were skipped).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export STASH_CLUSTER_DIR="${TMPDIR:-/tmp}/stash-test-cluster-$$"
# The node's stash image carries the debug binary `cargo test` builds anyway (tests/images/build.sh).
export STASH_IMAGE_PROFILE=${STASH_IMAGE_PROFILE:-dev}
# The chart tests' helm, the monitoring tests' promtool and the certificate tests' cert-manager (cached),
# built before the tests rather than inside the first one that needs them.
tests/cluster/build.sh helm >/dev/null
tests/cluster/build.sh promtool >/dev/null
tests/cluster/build.sh cert-manager >/dev/null
trap 'tests/cluster/cluster.sh down' EXIT
# Captured before eval: `eval "$(cluster.sh up)"` evaluates an empty string when up fails, and the tests
# would then run without the cluster they were promised (each binary starting a plain one, node tests skipped).
if [[ ${STASH_TEST_NODE:-1} == 0 ]]; then
  exports=$(tests/cluster/cluster.sh up)
else
  exports=$(tests/cluster/cluster.sh up --node)
fi
eval "$exports"
status=0
# Benches are load targets, not tests (clippy --all-targets in .ci/run compiles them).
cargo test --lib --bins --tests --no-fail-fast "$@" || status=$?
trap - EXIT
tests/cluster/cluster.sh down
tests/cluster/cluster.sh verify-down
exit "$status"
