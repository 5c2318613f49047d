#!/usr/bin/env bash
# A 1 GiB tree of mixed file sizes backed up into a fresh local repository twice in the same run:
# by `stash backup-job` (a PVC member of a session on the local control plane) and by the restic CLI
# directly, three rounds in alternating order. Prints median wall times, their ratio, the stash
# executor's own peak RSS and restic's.
#   bench/backup.sh [size-in-MiB]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size_mib=${1:-1024}
export STASH_CLUSTER_DIR="${TMPDIR:-/tmp}/stash-bench-backup-$$"
work=$(mktemp -d)
cleanup() { tests/cluster/cluster.sh down; rm -rf "$work"; }
trap cleanup EXIT
eval "$(tests/cluster/cluster.sh up)" >/dev/null
bin=$(tests/cluster/build.sh)
tools=$(tests/backends/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --release --quiet
stash=$PWD/target/release/stash

echo "generating a ${size_mib} MiB tree" >&2
python3 - "$work/root/stash-data" "$size_mib" <<'PY'
import os, random, sys
root, budget = sys.argv[1], int(sys.argv[2]) * 1024 * 1024
rng = random.Random(7)
sizes = [0, 100, 4_000, 60_000, 700_000, 8_000_000, 64_000_000]
weights = [2, 30, 30, 20, 10, 5, 1]
written, n = 0, 0
while written < budget:
    size = min(rng.choices(sizes, weights)[0], budget - written)
    d = os.path.join(root, f"d{n % 50:02d}", f"s{n % 7}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{n:06d}.bin"), "wb") as f:
        f.write(rng.randbytes(size))
    written, n = written + size, n + 1
print(f"{n} files", file=sys.stderr)
PY

"$stash" crds | kubectl apply --server-side -f - >/dev/null
kubectl wait --for condition=Established crd -l app.kubernetes.io/part-of=stash --timeout 60s >/dev/null
kubectl create namespace bench >/dev/null
mkdir -p "$work/secret"
printf 'bench-only-password' >"$work/secret/RESTIC_PASSWORD"
: >"$work/results"
kubectl apply -n bench -f - >/dev/null <<YAML
apiVersion: v1
kind: Secret
metadata: {name: repo-secret}
stringData: {RESTIC_PASSWORD: bench-only-password}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo}
spec: {backend: {storageSecretName: repo-secret, local: {mountPath: "$work/stash-repo", hostPath: {path: "$work/stash-repo"}}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 2Gi}}}
---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {name: bench}
spec:
  repository: {name: repo}
  members: [{target: {alias: data, ref: {apiVersion: v1, kind: PersistentVolumeClaim, name: data}}}]
YAML
# Both repositories are created before the timed runs (the steady state; a first backup's
# `restic init` costs the same on both sides). Three rounds, the order alternating, medians reported.
export KUBECONFIG POD_NAMESPACE=bench POD_NAME=bench-job-x7k2p STASH_RESTIC_BINARY="$tools/restic"
export RESTIC_PASSWORD=bench-only-password

run_stash() {
  rm -rf "$work/stash-repo"
  "$tools/restic" -r "$work/stash-repo" init -q
  sleep 1 # session names are per second
  local session
  session=$("$stash" trigger bench -n bench | sed 's#backupsession/\([^ ]*\) created#\1#')
  # No operator here: the session is set Running by hand, as the operator would.
  kubectl patch backupsession "$session" -n bench --subresource=status --type=merge -p \
    '{"status":{"phase":"Running","targets":[{"ref":{"apiVersion":"v1","kind":"PersistentVolumeClaim","name":"data"},"totalHosts":1,"phase":"Running"}]}}' >/dev/null
  sync
  # The executor's own peak (VmHWM of the stash process, polled) and the wall time of the whole run.
  local start pid hwm rss=0
  start=$(date +%s%N)
  "$stash" backup-job --invoker-name bench --session "$session" --target-kind PersistentVolumeClaim \
    --target-name data --secret-dir "$work/secret" --path-root "$work/root" 2>"$work/err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [[ -n $hwm ]] && rss=$hwm
    sleep 0.05
  done
  wait "$pid" || { cat "$work/err" >&2; exit 1; }
  echo "stash $(( ($(date +%s%N) - start) / 1000000 )) $rss" >>"$work/results"
  local phase
  phase=$(kubectl get backupsession "$session" -n bench -o jsonpath='{.status.targets[0].stats[0].phase}')
  [[ $phase == Succeeded ]] || { echo "the stash backup did not succeed: $phase" >&2; exit 1; }
}

run_restic() {
  rm -rf "$work/restic-repo"
  "$tools/restic" -r "$work/restic-repo" init -q
  sync
  (cd "$work/root" && /usr/bin/time -f "%e %M" -o "$work/time" \
    "$tools/restic" -r "$work/restic-repo" backup --json --host data stash-data >/dev/null)
  read -r wall rss <"$work/time"
  echo "restic $(python3 -c "print(int($wall * 1000))") $rss" >>"$work/results"
}

for round in 1 2 3; do
  if (( round % 2 )); then run_stash; run_restic; else run_restic; run_stash; fi
done
python3 - "$size_mib" "$work/results" <<'PY'
import statistics, sys
size, rows = sys.argv[1], [line.split() for line in open(sys.argv[2])]
wall = {k: statistics.median(int(r[1]) for r in rows if r[0] == k) / 1000 for k in ("stash", "restic")}
rss = {k: max(int(r[2]) for r in rows if r[0] == k) / 1024 for k in ("stash", "restic")}
runs = ", ".join(f"{r[0]} {int(r[1]) / 1000:.1f}" for r in rows)
print("| tree | stash backup-job wall (median of 3) | restic CLI wall (median of 3) | ratio | stash executor peak RSS | restic peak RSS |")
print("|---|---|---|---|---|---|")
print(f"| {size} MiB | {wall['stash']:.2f} s | {wall['restic']:.2f} s | {wall['stash'] / wall['restic']:.3f} | {rss['stash']:.1f} MiB | {rss['restic']:.1f} MiB |")
print(f"\nruns in order (s): {runs}")
PY
