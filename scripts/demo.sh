#!/usr/bin/env bash
# The main job: a local control plane on loopback, the stash CRDs, the operator (webhook + controllers)
# registered with it, the sample application's BackupBatch, and one backup triggered by hand.
#   scripts/demo.sh [manifest]   run it (default: deploy/samples/wordpress.yaml)
#   scripts/demo.sh down         stop the operator and the cluster
# There is no kubelet yet: Pods stay Pending, so the session runs until its timeOut.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

state=${STASH_DEMO_DIR:-${TMPDIR:-/tmp}/stash-demo}
webhook_port=${STASH_DEMO_WEBHOOK_PORT:-8443}
admin_port=${STASH_DEMO_ADMIN_PORT:-8080}

stop_operator() {
  if [[ -f "$state/operator.pid" ]]; then
    kill "$(cat "$state/operator.pid")" 2>/dev/null || true
    rm -f "$state/operator.pid"
  fi
}

if [[ ${1:-} == down ]]; then
  stop_operator
  tests/cluster/cluster.sh down
  exit 0
fi

sample=${1:-deploy/samples/wordpress.yaml}
eval "$(tests/cluster/cluster.sh up)"
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --quiet
stash=target/debug/stash
mkdir -p "$state"

echo "== CRDs"
"$stash" crds | kubectl apply --server-side --field-manager stash -f -
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s

echo "== webhook certificates and configuration"
if [[ ! -f "$state/certs/tls.crt" ]]; then
  "$stash" certs generate --out-dir "$state/certs" --ip 127.0.0.1 --dns localhost
fi
sed -e "s|caBundle: \"\"|caBundle: $(base64 -w0 "$state/certs/ca.crt")|" \
    -e "s|https://127.0.0.1:8443/|https://127.0.0.1:$webhook_port/|" webhook-config/local.yaml | kubectl apply -f -
kubectl create namespace stash --dry-run=client -o yaml | kubectl apply -f -

echo "== operator"
stop_operator
"$stash" operator --webhook-addr "127.0.0.1:$webhook_port" --admin-addr "127.0.0.1:$admin_port" \
  --tls-cert-file "$state/certs/tls.crt" --tls-key-file "$state/certs/tls.key" \
  --namespace stash --identity demo-operator >"$state/operator.log" 2>&1 &
echo $! >"$state/operator.pid"
until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do
  kill -0 "$(cat "$state/operator.pid")" 2>/dev/null || { cat "$state/operator.log"; exit 1; }
  sleep 0.5
done
echo "operator ready (log: $state/operator.log)"

echo "== sample"
kubectl apply -f "$sample"
namespace=$(kubectl apply -f "$sample" --dry-run=client -o jsonpath='{range .items[?(@.kind=="BackupBatch")]}{.metadata.namespace}{end}')
batch=$(kubectl apply -f "$sample" --dry-run=client -o jsonpath='{range .items[?(@.kind=="BackupBatch")]}{.metadata.name}{end}')
kubectl wait --for=jsonpath='{.status.phase}'=Ready "backupbatch/$batch" -n "$namespace" --timeout 60s

echo "== back up now"
"$stash" trigger "$batch" -n "$namespace"
sleep 3
kubectl get stash -n "$namespace"
echo
"$stash" sessions "$batch" -n "$namespace"
echo
echo "Pods (the webhook injected the stash sidecar into the workload's Pods):"
kubectl get pods -n "$namespace" -o custom-columns='POD:.metadata.name,CONTAINERS:.spec.containers[*].name,PHASE:.status.phase'
echo
echo "The cluster and operator keep running:  export KUBECONFIG=$KUBECONFIG"
echo "Stop both with:                         scripts/demo.sh down"
