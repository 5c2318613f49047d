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
  local pid
  for pid in operator sidecar rest-server; do
    if [[ -f "$state/$pid.pid" ]]; then
      kill "$(cat "$state/$pid.pid")" 2>/dev/null || true
      rm -f "$state/$pid.pid"
    fi
  done
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

echo "== the data path, here: no kubelet yet, so the executors run as local processes"
# The sample's REST server is a Service in a real cluster; here it is restic's rest-server on loopback,
# and what the Pods see as / is $state/root.
tools=$(tests/backends/build.sh)
rest_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$state/rest" "$state/secret" "$state/root/var/www/html" "$state/root/stash-data/2026"
"$tools/rest-server" --listen "127.0.0.1:$rest_port" --path "$state/rest" --no-auth >/dev/null 2>&1 &
echo $! >"$state/rest-server.pid"
repository=$(kubectl get backupbatch "$batch" -n "$namespace" -o jsonpath='{.spec.repository.name}')
kubectl patch repository "$repository" -n "$namespace" --type merge \
  -p "{\"spec\":{\"backend\":{\"rest\":{\"url\":\"http://127.0.0.1:$rest_port/$batch\"}}}}" >/dev/null
secret=$(kubectl get repository "$repository" -n "$namespace" -o jsonpath='{.spec.backend.storageSecretName}')
kubectl get secret "$secret" -n "$namespace" -o json | python3 -c '
import base64, json, os, sys
for key, value in json.load(sys.stdin).get("data", {}).items():
    with open(os.path.join(sys.argv[1], key), "wb") as f: f.write(base64.b64decode(value))' "$state/secret"
echo "<h1>hello from the demo</h1>" >"$state/root/var/www/html/index.html"
head -c 3000000 /dev/urandom >"$state/root/stash-data/2026/photo.jpg"
export POD_NAMESPACE=$namespace STASH_RESTIC_BINARY="$tools/restic"
executor() { "$stash" "$@" --secret-dir "$state/secret" --path-root "$state/root"; }
POD_NAME=wordpress-demo-x7k2p "$stash" run-backup --invoker-name "$batch" --target-kind Deployment \
  --target-name wordpress --secret-dir "$state/secret" --path-root "$state/root" >>"$state/sidecar.log" 2>&1 &
echo $! >"$state/sidecar.pid"

echo "== back up now"
session=$("$stash" trigger "$batch" -n "$namespace" | sed 's#backupsession/\([^ ]*\) created#\1#')
echo "session $session"
ran=" "
for _ in $(seq 1 300); do
  # Play kubelet: run each Job the operator created for the session, once.
  for job in $(kubectl get jobs -n "$namespace" -l "stash.appscode.com/backup-session=$session" -o name); do
    [[ $ran == *" $job "* ]] && continue
    ran+="$job "
    mapfile -t args < <(kubectl get "$job" -n "$namespace" -o jsonpath='{.spec.template.spec.containers[0].args}' |
      python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))')
    echo "running $job: stash ${args[*]}"
    POD_NAME="${job#job.batch/}-x7k2p" executor "${args[@]}" || true
  done
  finalized=$(kubectl get backupsession "$session" -n "$namespace" \
    -o jsonpath='{.status.conditions[?(@.type=="SessionFinalized")].status}')
  [[ -n $finalized ]] && break
  sleep 1
done
kubectl get stash -n "$namespace"
echo
"$stash" sessions "$batch" -n "$namespace"
echo
echo "The complete sessions recorded in the repository itself:"
executor sessions "$batch" -n "$namespace" --from-repository
echo
echo "restic's own view:"
RESTIC_PASSWORD_FILE="$state/secret/RESTIC_PASSWORD" "$tools/restic" -r "rest:http://127.0.0.1:$rest_port/$batch" \
  snapshots --no-lock
echo
echo "Pods (the webhook injected the stash sidecar into the workload's Pods):"
kubectl get pods -n "$namespace" -o custom-columns='POD:.metadata.name,CONTAINERS:.spec.containers[*].name,PHASE:.status.phase'
echo
echo "The cluster and operator keep running:  export KUBECONFIG=$KUBECONFIG"
echo "Stop both with:                         scripts/demo.sh down"
