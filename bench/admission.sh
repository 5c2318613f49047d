#!/usr/bin/env bash
# What the admission webhook adds to Pod creation, through the real API server: a Deployment that is a
# member of a BackupBatch scaled from 0 to N Pods (default 1,000) by the controller manager, with the
# webhook registered (every Pod is mutated: owner lookup, member lookup, patch) and without it,
# REPEATS rounds (default 3) alternating. Pods stay Pending (no node): admission is all that is measured.
# Reported per run: wall time until N Pods exist, the API server's own histograms for Pod creation
# (apiserver_request_duration_seconds, POST pods) and for the webhook call
# (apiserver_admission_webhook_admission_duration_seconds), and the webhook's server-side histogram.
#   REPEATS=3 bench/admission.sh [pods]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pods=${1:-1000}
repeats=${REPEATS:-3}
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --release --quiet
stash=target/release/stash
work=$(mktemp -d)
export STASH_CLUSTER_DIR="$work/cluster"
operator_pid=
cleanup() {
  [[ -n $operator_pid ]] && kill "$operator_pid" 2>/dev/null
  tests/cluster/cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
exports=$(tests/cluster/cluster.sh up) # outside eval, which would hide a failed up
eval "$exports"
read -r webhook_port admin_port < <(python3 -c '
import socket
ports = []
for _ in range(2):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s)
print(*[s.getsockname()[1] for s in ports])')

"$stash" crds | kubectl apply --server-side -f - >/dev/null
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
kubectl create namespace bench >/dev/null
kubectl create namespace stash >/dev/null
kubectl apply -n bench -f - >/dev/null <<'YAML'
apiVersion: v1
kind: Secret
metadata: {name: repo-secret}
stringData: {RESTIC_PASSWORD: bench-only}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo}
spec: {backend: {storageSecretName: repo-secret, rest: {url: "http://127.0.0.1:8000/"}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
spec:
  replicas: 0
  selector: {matchLabels: {app: app}}
  template:
    # Marked as already restarted once for the sidecar, so that the controllers never roll it here.
    metadata: {labels: {app: app}, annotations: {stash.appscode.com/sidecar-rollout: app-backup}}
    spec:
      containers: [{name: app, image: registry.invalid/app:1, volumeMounts: [{name: data, mountPath: /data}]}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {name: app-backup}
spec:
  repository: {name: repo}
  members: [{target: {alias: app, ref: {apiVersion: apps/v1, kind: Deployment, name: app}, paths: [/data],
    volumeMounts: [{name: data, mountPath: /data}]}}]
YAML

"$stash" certs generate --out-dir "$work/certs" --ip 127.0.0.1 >/dev/null
RUST_LOG=warn "$stash" operator --webhook-addr "127.0.0.1:$webhook_port" --admin-addr "127.0.0.1:$admin_port" \
  --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
  --namespace stash --identity bench >"$work/operator.log" 2>&1 &
operator_pid=$!
until curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null; do sleep 0.5; done
python3 - webhook-config/local.yaml "$webhook_port" "$work/certs/ca.crt" >"$work/webhook.yaml" <<'PY'
import base64, sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["metadata"]["name"] = "stash-bench"
webhook = config["webhooks"][0]
webhook["clientConfig"] = {"url": f"https://127.0.0.1:{sys.argv[2]}/mutate-pods",
                           "caBundle": base64.b64encode(open(sys.argv[3], "rb").read()).decode()}
webhook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": "bench"}}
print(yaml.safe_dump(config))
PY

pod_count() { kubectl get pods -n bench -o name | wc -l; }
injected_count() {
  kubectl get pods -n bench -o jsonpath='{range .items[*]}{.spec.containers[*].name}{"\n"}{end}' | grep -c stash || true
}
snapshot() { # $1: file; the API server's and the webhook's metrics
  kubectl get --raw /metrics >"$1.api"
  curl -sf "http://127.0.0.1:$admin_port/metrics" >"$1.webhook"
}
scale_to_zero() {
  kubectl scale deployment app -n bench --replicas 0 >/dev/null
  kubectl delete pods -n bench --all --wait=false >/dev/null
  until (($(pod_count) == 0)); do sleep 1; done
}
run() { # $1: webhook | none; $2: round
  if [[ $1 == webhook ]]; then
    kubectl apply -f "$work/webhook.yaml" >/dev/null
    # The API server picks up a webhook configuration from its informer: prove it with one Pod.
    kubectl scale deployment app -n bench --replicas 1 >/dev/null
    until (($(injected_count) == 1)); do sleep 0.5; done
  else
    kubectl delete -f "$work/webhook.yaml" --ignore-not-found >/dev/null
    sleep 2
    kubectl scale deployment app -n bench --replicas 1 >/dev/null
    until (($(pod_count) == 1)) && (($(injected_count) == 0)); do sleep 0.5; done
  fi
  scale_to_zero
  snapshot "$work/before"
  local t0 t1
  t0=$(date +%s.%N)
  kubectl scale deployment app -n bench --replicas "$pods" >/dev/null
  until (($(pod_count) >= pods)); do sleep 0.5; done
  t1=$(date +%s.%N)
  snapshot "$work/after"
  local injected
  injected=$(injected_count)
  python3 - "$1" "$2" "$t0" "$t1" "$injected" "$work/before" "$work/after" >>"$work/results.tsv" <<'PY'
import re, sys
mode, round_, t0, t1, injected, before, after = sys.argv[1:]
def histogram(path, name, match):
    buckets, total, count = {}, 0.0, 0.0
    for line in open(path):
        # A series without labels (the webhook's own histogram) has no braces.
        m = re.match(rf'{name}_(bucket|sum|count)(?:\{{(.*)\}})? (\S+)', line)
        if not m or not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in match.items()):
            continue
        kind, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if kind == "bucket":
            le = re.search(r'le="([^"]+)"', labels).group(1)
            le = float("inf") if le == "+Inf" else float(le)
            buckets[le] = buckets.get(le, 0.0) + value
        elif kind == "sum":
            total += value
        else:
            count += value
    return buckets, total, count
def diff(name, match):
    b0, s0, c0 = histogram(f"{before}.{source(name)}", name, match)
    b1, s1, c1 = histogram(f"{after}.{source(name)}", name, match)
    return {le: b1[le] - b0.get(le, 0.0) for le in b1}, s1 - s0, c1 - c0
def source(name):
    return "webhook" if name.startswith("stash_") else "api"
def quantile(buckets, q):
    # Linear within the bucket, as Prometheus' histogram_quantile does.
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in edges:
        if buckets[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(buckets[le] - below, 1e-12)
        lower, below = le, buckets[le]
    return lower
def summary(name, match):
    buckets, total, count = diff(name, match)
    if not count:
        return "-", "-", "-", 0
    return (f"{1000 * quantile(buckets, 0.5):.2f}", f"{1000 * quantile(buckets, 0.99):.2f}",
            f"{1000 * total / count:.2f}", int(count))
create = summary("apiserver_request_duration_seconds", {"verb": "POST", "resource": "pods"})
hook = summary("apiserver_admission_webhook_admission_duration_seconds", {"name": "sidecar.stash.appscode.com"})
served = summary("stash_webhook_request_duration_seconds", {})
print("\t".join(map(str, [mode, round_, round(float(t1) - float(t0), 1), injected, *create, *hook, *served])))
PY
  scale_to_zero
}

: >"$work/results.tsv"
for round in $(seq 1 "$repeats"); do
  if ((round % 2)); then run webhook "$round"; run none "$round"; else run none "$round"; run webhook "$round"; fi
done
kubectl delete -f "$work/webhook.yaml" --ignore-not-found >/dev/null

echo "| webhook | round | wall until $pods Pods | Pods mutated | Pod create p50 / p99 / mean (ms) | webhook call p50 / p99 / mean (ms) | calls | server-side p50 / p99 / mean (ms) |"
echo "|---|---|---|---|---|---|---|---|"
while IFS=$'\t' read -r mode round wall injected c50 c99 cmean _ h50 h99 hmean hcount s50 s99 smean _; do
  if [[ $mode == none ]]; then h50=-; h99=-; hmean=-; hcount=0; s50=-; s99=-; smean=-; fi
  echo "| $mode | $round | $wall s | $injected | $c50 / $c99 / $cmean | $h50 / $h99 / $hmean | $hcount | $s50 / $s99 / $smean |"
done <"$work/results.tsv"
