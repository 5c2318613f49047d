#!/usr/bin/env bash
# N (default 1,000) BackupBatches (3 PVC members each) created at once on the local control plane, reconciled by a
# release `stash operator`: time until every trigger CronJob exists and every batch is Ready, API
# requests per batch (from the API server's audit log, by user agent: apiserver_request_total has no
# user-agent label), operator peak RSS, and requests in an idle minute. The floor: kubectl creating the
# same 1,000 CronJobs directly. Prints a Markdown summary.
#   bench/controllers.sh [batches]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
count=${1:-1000}
export STASH_CLUSTER_DIR="${TMPDIR:-/tmp}/stash-bench-cluster-$$" STASH_CLUSTER_AUDIT=1
work=$(mktemp -d)
operator_pid=
cleanup() {
  [[ -n $operator_pid ]] && kill "$operator_pid" 2>/dev/null
  tests/cluster/cluster.sh down
  rm -rf "$work"
}
trap cleanup EXIT
eval "$(tests/cluster/cluster.sh up)" >/dev/null
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --release --quiet
stash=target/release/stash

# Completed non-watch requests from the user agent prefix $1, per the API server's audit log.
requests() {
  python3 - "$1" "$STASH_CLUSTER_DIR/audit.log" <<'PY'
import json, sys
agent, total = sys.argv[1], 0
for line in open(sys.argv[2]):
    event = json.loads(line)
    if event.get("stage") == "ResponseComplete" and event.get("userAgent", "").startswith(agent) \
            and event.get("verb") not in ("watch", "watchlist"):
        total += 1
print(total)
PY
}

"$stash" crds | kubectl apply --server-side -f - >/dev/null
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
kubectl create namespace bench >/dev/null
kubectl create namespace stash >/dev/null
python3 - "$count" >"$work/setup.yaml" <<'PY'
import sys
n = int(sys.argv[1])
print("""apiVersion: v1
kind: Secret
metadata: {name: repo-secret, namespace: bench}
stringData: {RESTIC_PASSWORD: bench-only}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo, namespace: bench}
spec: {backend: {storageSecretName: repo-secret, rest: {url: "http://127.0.0.1:8000/"}}}""")
for i in range(n):
    for m in "abc":
        print(f"""---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data-{i}-{m}, namespace: bench}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}""")
PY
python3 - "$count" >"$work/batches.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    members = ", ".join(f"{{target: {{alias: {m}, ref: {{apiVersion: v1, kind: PersistentVolumeClaim, name: data-{i}-{m}}}}}}}" for m in "abc")
    print(f"""---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {{name: app-{i}, namespace: bench}}
spec: {{repository: {{name: repo}}, schedule: "0 3 * * *", members: [{members}]}}""")
PY
python3 - "$count" >"$work/cronjobs.yaml" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    print(f"""---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: floor-{i}, namespace: floor}}
spec:
  schedule: "0 3 * * *"
  suspend: false
  concurrencyPolicy: Forbid
  jobTemplate: {{spec: {{template: {{spec: {{restartPolicy: OnFailure, serviceAccountName: stash-trigger,
    containers: [{{name: trigger, image: "stash:0.1.0", args: [create-backupsession, --invoker-kind=BackupBatch, --invoker-name=app-{i}]}}]}}}}}}}}""")
PY
kubectl create -f "$work/setup.yaml" >/dev/null

"$stash" certs generate --out-dir "$work/certs" --ip 127.0.0.1 >/dev/null
RUST_LOG=warn "$stash" operator --webhook-addr 127.0.0.1:0 --admin-addr 127.0.0.1:0 \
  --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
  --namespace stash --identity bench >"$work/operator.log" 2>&1 &
operator_pid=$!
sleep 3
before=$(requests stash-operator/)

start=$(date +%s.%N)
kubectl create -f "$work/batches.yaml" >/dev/null
until [[ $(kubectl get cronjobs -n bench -o name | wc -l) -ge $count ]]; do sleep 1; done
until [[ $(kubectl get backupbatches -n bench -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Ready$') -ge $count ]]; do sleep 1; done
end=$(date +%s.%N)
after=$(requests stash-operator/)
rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$operator_pid/status")

sleep 5
idle_start=$(requests stash-operator/)
sleep 60
idle_end=$(requests stash-operator/)

kubectl create namespace floor >/dev/null
floor_start=$(date +%s.%N)
kubectl create -f "$work/cronjobs.yaml" >/dev/null
until [[ $(kubectl get cronjobs -n floor -o name | wc -l) -ge $count ]]; do sleep 1; done
floor_end=$(date +%s.%N)

python3 - "$count" "$start" "$end" "$before" "$after" "$rss" "$idle_start" "$idle_end" "$floor_start" "$floor_end" <<'PY'
import sys
n, start, end, before, after, rss, idle0, idle1, f0, f1 = sys.argv[1:]
n = int(n)
print(f"| batches | every CronJob + every batch Ready | operator requests | per batch | operator peak RSS | requests in an idle minute | floor: kubectl creating {n} CronJobs |")
print("|---|---|---|---|---|---|---|")
print(f"| {n} | {float(end)-float(start):.1f} s | {int(after)-int(before)} | {(int(after)-int(before))/n:.1f} | {rss} MiB | {int(idle1)-int(idle0)} | {float(f1)-float(f0):.1f} s |")
PY
