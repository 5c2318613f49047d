#!/usr/bin/env bash
# The controllers at scale. For each N given (default: 100 1000), REPEATS times (default 3), on a fresh
# local control plane with an audit log: N BackupBatches of 3 PVC members each, created at once with
# `kubectl create`, reconciled by a release `stash operator` run as its own process. Measured per run:
# time until every trigger CronJob exists and every batch is Ready; the operator's API requests by verb
# and resource (from the audit log, by user agent: apiserver_request_total has no user-agent label;
# watches excluded); operator peak RSS and CPU seconds; API server CPU seconds; the operator's requests
# in the following idle minute; then a restart: time until a new operator process (a new leader) has
# reconciled every batch again, and its peak RSS. The floor, in the same run: `kubectl create` of the
# same N CronJobs.
# CLUSTER_PODS=P first fills a namespace of its own with P Pods (Pending: no node) and P/10 Deployments
# scaled to zero, none of them a member: what the operator's caches of workloads and Pods hold in a
# busy cluster.
# Writes Markdown tables to stdout and the plot to docs/bench/controllers.svg (gnuplot).
#   REPEATS=3 [SCHEMA_COST=0] [CLUSTER_PODS=0] bench/controllers.sh [N ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if (($#)); then counts=("$@"); else counts=(100 1000); fi
repeats=${REPEATS:-3}
tests/apt-ensure.sh gnuplot-nox >/dev/null
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --release --quiet
stash=target/release/stash
work=$(mktemp -d)
export STASH_CLUSTER_DIR="$work/cluster" STASH_CLUSTER_AUDIT=1
operator_pid=
stop_operator() {
  [[ -n $operator_pid ]] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  operator_pid=
}
cleanup() {
  stop_operator || true
  tests/cluster/cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

admin_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_operator() {
  RUST_LOG=warn "$stash" operator --webhook-addr 127.0.0.1:0 --admin-addr "127.0.0.1:$admin_port" \
    --tls-cert-file "$work/certs/tls.crt" --tls-key-file "$work/certs/tls.key" \
    --namespace stash --identity bench >>"$work/operator.log" 2>&1 &
  operator_pid=$!
}
# Successful BackupBatch reconciles of the running operator.
reconciled_batches() {
  curl -sf "http://127.0.0.1:$admin_port/metrics" |
    awk '/^stash_reconciles_total\{.*controller="backupbatch".*result="Ok"/ {s += $2} END {print s + 0}'
}
# CPU seconds (user + system) a process has used so far.
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat"; }
now() { date +%s.%N; }
# Waits until `$1` (a command printing a number) prints at least $2, polling every $3 s.
wait_for_count() {
  until (($($1) >= $2)); do sleep "$3"; done
}
cronjobs_in() { kubectl get cronjobs -n "$1" -o name | wc -l; }
bench_cronjobs() { cronjobs_in bench; }
floor_cronjobs() { cronjobs_in floor; }
ready_batches() {
  kubectl get backupbatches -n bench -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Ready$' || true
}

manifests() { # N → setup.yaml batches.yaml cronjobs.yaml in $work
  python3 - "$1" "$work" <<'PY'
import os, sys
n, work = int(sys.argv[1]), sys.argv[2]
with open(f"{work}/setup.yaml", "w") as out:
    out.write("""apiVersion: v1
kind: Secret
metadata: {name: repo-secret, namespace: bench}
stringData: {RESTIC_PASSWORD: bench-only}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo, namespace: bench}
spec: {backend: {storageSecretName: repo-secret, rest: {url: "http://127.0.0.1:8000/"}}}
""")
    for i in range(n):
        for m in "abc":
            out.write(f"""---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data-{i}-{m}, namespace: bench}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
""")
pods = int(os.environ.get("CLUSTER_PODS", "0"))
with open(f"{work}/cluster.yaml", "w") as out:
    for i in range(pods):
        out.write(f"""---
apiVersion: v1
kind: Pod
metadata:
  name: web-{i}
  namespace: cluster
  labels: {{app: web-{i // 10}, pod-template-hash: 5d8f7c9b4{i % 10}, tier: frontend}}
  annotations: {{kubectl.kubernetes.io/restartedAt: "2026-11-28T00:00:00Z", prometheus.io/scrape: "true"}}
spec: {{containers: [{{name: web, image: "registry.invalid/web:1.2.3", ports: [{{containerPort: 8080}}]}}]}}
""")
    for i in range(pods // 10):
        out.write(f"""---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{i}, namespace: cluster, labels: {{app: web-{i}}}}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}, tier: frontend}}}}
    spec: {{containers: [{{name: web, image: "registry.invalid/web:1.2.3", ports: [{{containerPort: 8080}}]}}]}}
""")
with open(f"{work}/batches.yaml", "w") as out:
    for i in range(n):
        members = ", ".join(f"{{target: {{alias: {m}, ref: {{apiVersion: v1, kind: PersistentVolumeClaim, name: data-{i}-{m}}}}}}}" for m in "abc")
        out.write(f"""---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {{name: app-{i}, namespace: bench}}
spec: {{repository: {{name: repo}}, schedule: "0 3 * * *", members: [{members}]}}
""")
with open(f"{work}/cronjobs.yaml", "w") as out:
    for i in range(n):
        out.write(f"""---
apiVersion: batch/v1
kind: CronJob
metadata: {{name: floor-{i}, namespace: floor}}
spec:
  schedule: "0 3 * * *"
  suspend: false
  concurrencyPolicy: Forbid
  jobTemplate: {{spec: {{template: {{spec: {{restartPolicy: OnFailure, serviceAccountName: stash-trigger,
    containers: [{{name: trigger, image: "stash:0.1.0", args: [create-backupsession, --invoker-kind=BackupBatch, --invoker-name=app-{i}]}}]}}}}}}}}
""")
PY
}

# Operator requests (non-watch, completed) between two Unix times, by verb and resource, as JSON.
audit_requests() {
  python3 - "$STASH_CLUSTER_DIR/audit.log" "$1" "$2" <<'PY'
import json, sys, collections, datetime
log, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
counts = collections.Counter()
for line in open(log):
    event = json.loads(line)
    if event.get("stage") != "ResponseComplete" or not event.get("userAgent", "").startswith("stash-operator/"):
        continue
    if event.get("verb") in ("watch", "watchlist"):
        continue
    at = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
    if start <= at <= end:
        ref = event.get("objectRef", {})
        resource = ref.get("resource", "other") + ("/" + ref["subresource"] if ref.get("subresource") else "")
        counts[f"{event['verb']} {resource}"] += 1
print(json.dumps(counts))
PY
}

results=$work/results.tsv
: >"$results"
for n in "${counts[@]}"; do
  poll=$((n >= 5000 ? 5 : 1))
  manifests "$n"
  for repeat in $(seq 1 "$repeats"); do
    exports=$(tests/cluster/cluster.sh up) # outside eval, which would hide a failed up
    eval "$exports"
    apiserver=$(cat "$STASH_CLUSTER_DIR/kube-apiserver.pid")
    "$stash" crds | kubectl apply --server-side -f - >/dev/null
    kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
    kubectl create namespace bench >/dev/null
    kubectl create namespace stash >/dev/null
    kubectl create -f "$work/setup.yaml" >/dev/null
    if [[ -s $work/cluster.yaml ]]; then
      kubectl create namespace cluster >/dev/null
      kubectl create -f "$work/cluster.yaml" >/dev/null
    fi

    "$stash" certs generate --out-dir "$work/certs" --ip 127.0.0.1 >/dev/null
    start_operator
    sleep 3
    api_cpu0=$(cpu_seconds "$apiserver")
    op_cpu0=$(cpu_seconds "$operator_pid")

    start=$(now)
    kubectl create -f "$work/batches.yaml" >/dev/null
    wait_for_count bench_cronjobs "$n" "$poll"
    wait_for_count ready_batches "$n" "$poll"
    end=$(now)
    api_cpu1=$(cpu_seconds "$apiserver")
    op_cpu1=$(cpu_seconds "$operator_pid")
    rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$operator_pid/status")
    sleep 5
    idle0=$(now)
    sleep 60
    idle1=$(now)

    # A new leader over N Ready batches: every one is reconciled again (from the caches) at once.
    stop_operator
    restart0=$(now)
    start_operator
    wait_for_count reconciled_batches "$n" "$poll"
    restart1=$(now)
    restart_rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$operator_pid/status")
    stop_operator

    kubectl create namespace floor >/dev/null
    floor0=$(now)
    kubectl create -f "$work/cronjobs.yaml" >/dev/null
    wait_for_count floor_cronjobs "$n" "$poll"
    floor1=$(now)

    busy=$(audit_requests "$start" "$end")
    idle=$(audit_requests "$idle0" "$idle1")
    python3 - "$n" "$repeat" "$start" "$end" "$floor0" "$floor1" "$rss" "$op_cpu0" "$op_cpu1" "$api_cpu0" "$api_cpu1" \
      "$busy" "$idle" "$restart0" "$restart1" "$restart_rss" >>"$results" <<'PY'
import json, sys
n, repeat, start, end, f0, f1, rss, o0, o1, a0, a1, busy, idle, r0, r1, restart_rss = sys.argv[1:]
busy, idle = json.loads(busy), json.loads(idle)
# The Lease is renewed every few seconds whatever the load: the idle minute counts everything else.
idle_other = sum(v for k, v in idle.items() if not k.endswith(" leases"))
print("\t".join(map(str, [n, repeat, round(float(end) - float(start), 1), round(float(f1) - float(f0), 1),
    sum(busy.values()), rss, round(float(o1) - float(o0), 1), round(float(a1) - float(a0), 1), idle_other,
    json.dumps(busy), round(float(r1) - float(r0), 1), restart_rss])))
PY
    tests/cluster/cluster.sh down >/dev/null
    rm -rf "$STASH_CLUSTER_DIR" "$work/certs"
  done
done

# What the BackupBatch CRD's schema (176 KB of JSON, most of it the Pod runtime settings) costs the API
# server: kubectl creating the same N batches (no operator) under the full schema and under a minimal
# one (`x-kubernetes-preserve-unknown-fields`), alternating, twice each, on one control plane; N is
# the last one given. SCHEMA_COST=0 skips it.
n=${counts[-1]}
if [[ ${SCHEMA_COST:-1} == 0 ]]; then schema_rows=(); else
manifests "$n"
exports=$(tests/cluster/cluster.sh up) # outside eval, which would hide a failed up
eval "$exports"
apiserver=$(cat "$STASH_CLUSTER_DIR/kube-apiserver.pid")
"$stash" crds >"$work/full.yaml"
python3 - "$work/full.yaml" "$work/minimal.yaml" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
for doc in docs:
    if doc["metadata"]["name"] == "backupbatches.stash.appscode.com":
        for version in doc["spec"]["versions"]:
            version["schema"] = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
schema_rows=()
for round in 1 2; do
  for schema in full minimal; do
    kubectl apply --server-side --force-conflicts -f "$work/$schema.yaml" >/dev/null
    kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
    sleep 2
    ns=$schema-$round
    kubectl create namespace "$ns" >/dev/null
    cpu0=$(cpu_seconds "$apiserver")
    t0=$(now)
    sed "s/namespace: bench/namespace: $ns/" "$work/batches.yaml" | kubectl create -f - >/dev/null
    t1=$(now)
    cpu1=$(cpu_seconds "$apiserver")
    schema_rows+=("$schema $round $(python3 -c "print(round($t1 - $t0, 1), round($cpu1 - $cpu0, 1))")")
  done
done
tests/cluster/cluster.sh down >/dev/null
rm -rf "$STASH_CLUSTER_DIR"
echo
echo "### The BackupBatch schema's cost: kubectl creating $n batches, no operator"
echo
echo "| schema | round | wall | API server CPU |"
echo "|---|---|---|---|"
for row in "${schema_rows[@]}"; do
  read -r schema round wall cpu <<<"$row"
  echo "| $schema | $round | $wall s | $cpu s |"
done
fi

mkdir -p docs/bench
python3 - "$results" "$work/plot.tsv" <<'PY'
import json, os, sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    n, repeat, ready, floor, requests, rss, op_cpu, api_cpu, idle, busy, restart, restart_rss = line.rstrip("\n").split("\t")
    rows[int(n)].append(dict(repeat=int(repeat), ready=float(ready), floor=float(floor), requests=int(requests),
        rss=float(rss), op_cpu=float(op_cpu), api_cpu=float(api_cpu), idle=int(idle), busy=json.loads(busy),
        restart=float(restart), restart_rss=float(restart_rss)))
def spread(values, unit="", fmt="{:.1f}"):
    return f"{fmt.format(statistics.median(values))}{unit} ({fmt.format(min(values))}–{fmt.format(max(values))})"
with open(sys.argv[2], "w") as plot:
    for n, runs in sorted(rows.items()):
        ratio = [r["ready"] / r["floor"] for r in runs]
        per = [r["requests"] / n for r in runs]
        pods = int(os.environ.get("CLUSTER_PODS", "0"))
        beside = f"; beside {pods:,} other Pods and {pods // 10:,} Deployments" if pods else ""
        print(f"\n### {n:,} batches ({len(runs)} runs; median, with min–max{beside})\n")
        print("| run | all CronJobs + all Ready | floor | ratio | requests | per batch | operator peak RSS | operator CPU | API server CPU | requests in the idle minute (Lease aside) | restart: all reconciled | restart: peak RSS |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['repeat']} | {r['ready']:.1f} s | {r['floor']:.1f} s | {r['ready']/r['floor']:.1f}× | {r['requests']:,} | {r['requests']/n:.1f} | {r['rss']:.1f} MiB | {r['op_cpu']:.1f} s | {r['api_cpu']:.1f} s | {r['idle']} | {r['restart']:.1f} s | {r['restart_rss']:.1f} MiB |")
        print(f"| **median** | {spread([r['ready'] for r in runs], ' s')} | {spread([r['floor'] for r in runs], ' s')} | {spread(ratio, '×')} | | {spread(per)} | {spread([r['rss'] for r in runs], ' MiB')} | {spread([r['op_cpu'] for r in runs], ' s')} | {spread([r['api_cpu'] for r in runs], ' s')} | {max(r['idle'] for r in runs)} (max) | {spread([r['restart'] for r in runs], ' s')} | {spread([r['restart_rss'] for r in runs], ' MiB')} |")
        verbs = collections.Counter()
        for r in runs:
            verbs.update(r["busy"])
        print(f"\nRequests per batch by verb and resource (mean of the runs): " + ", ".join(
            f"{k} {v / len(runs) / n:.2f}" for k, v in verbs.most_common()))
        plot.write(f"{n}\t{statistics.median([r['ready'] for r in runs])}\t{statistics.median([r['floor'] for r in runs])}\t{statistics.median(per)}\n")
PY
gnuplot <<EOF
set terminal svg size 900,360 dynamic font "sans,11"
set output "docs/bench/controllers.svg"
set multiplot layout 1,2 title "bench/controllers.sh: N BackupBatches of 3 PVC members, one operator ($(date +%F))"
set logscale xy
set xlabel "batches"
set ylabel "seconds until all CronJobs exist and all batches are Ready"
set key top left
plot "$work/plot.tsv" using 1:2 with linespoints title "stash operator", \
     "$work/plot.tsv" using 1:3 with linespoints title "floor: kubectl creating the CronJobs"
unset logscale y
set yrange [0:*]
set ylabel "operator API requests per batch"
plot "$work/plot.tsv" using 1:4 with linespoints title "requests per batch"
unset multiplot
EOF
echo "plot: docs/bench/controllers.svg" >&2
