#!/usr/bin/env bash
# The main job: a local control plane on loopback, the stash CRDs, and the sample application's
# BackupBatch (deploy/samples/wordpress.yaml unless a manifest is given). Leaves the cluster running;
# stop it with `tests/cluster/cluster.sh down`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

sample=${1:-deploy/samples/wordpress.yaml}
eval "$(tests/cluster/cluster.sh up)"
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }

cargo build --quiet
target/debug/stash crds | kubectl apply --server-side --field-manager stash -f -
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s
kubectl apply -f "$sample"
kubectl get stash -A
echo
echo "The cluster keeps running:  export KUBECONFIG=$KUBECONFIG"
