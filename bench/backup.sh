#!/usr/bin/env bash
# A 1 GiB tree of mixed file sizes backed up into a fresh local repository twice in the same run:
# by `stash backup-job` (a PVC member of a session on the local control plane) and by the restic CLI
# directly. Prints wall times, their ratio, the stash executor's own peak RSS and restic's.
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
session=$("$stash" trigger bench -n bench | sed 's#backupsession/\([^ ]*\) created#\1#')
# No operator here: the session is set Running by hand, as the operator would.
kubectl patch backupsession "$session" -n bench --subresource=status --type=merge -p \
  '{"status":{"phase":"Running","targets":[{"ref":{"apiVersion":"v1","kind":"PersistentVolumeClaim","name":"data"},"totalHosts":1,"phase":"Running"}]}}' >/dev/null

# Both repositories exist before the timed runs (the steady state; the first backup's `restic init`
# costs the same on both sides).
RESTIC_PASSWORD=bench-only-password "$tools/restic" -r "$work/stash-repo" init -q
export KUBECONFIG POD_NAMESPACE=bench POD_NAME=bench-job-x7k2p STASH_RESTIC_BINARY="$tools/restic"
timed() { /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }; cat "$work/time"; }
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
# The executor's own peak (VmHWM of the stash process, polled), and the whole run's wall time.
start=$(date +%s.%N)
"$stash" backup-job --invoker-name bench --session "$session" --target-kind PersistentVolumeClaim \
  --target-name data --secret-dir "$work/secret" --path-root "$work/root" 2>"$work/err" &
pid=$! stash_rss=0
while kill -0 "$pid" 2>/dev/null; do
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [[ -n $hwm ]] && stash_rss=$hwm
  sleep 0.1
done
wait "$pid" || { cat "$work/err" >&2; exit 1; }
stash_wall=$(python3 -c "import time; print(time.time() - $start)")
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
export RESTIC_PASSWORD=bench-only-password RESTIC_REPOSITORY="$work/restic-repo"
"$tools/restic" init -q
read -r restic_wall restic_rss < <(cd "$work/root" && timed "$tools/restic" backup --json --host data stash-data)
phase=$(kubectl get backupsession "$session" -n bench -o jsonpath='{.status.targets[0].stats[0].phase}')
[[ $phase == Succeeded ]] || { echo "the stash backup did not succeed: $phase" >&2; exit 1; }
python3 - "$size_mib" "$stash_wall" "$stash_rss" "$restic_wall" "$restic_rss" <<'PY'
import sys
size, sw, sr, rw, rr = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"| tree | stash backup-job wall | restic CLI wall | ratio | stash executor peak RSS | restic peak RSS |")
print(f"|---|---|---|---|---|---|")
print(f"| {size} MiB | {sw:.1f} s | {rw:.1f} s | {sw / rw:.3f} | {sr / 1024:.1f} MiB | {rr / 1024:.1f} MiB |")
PY
