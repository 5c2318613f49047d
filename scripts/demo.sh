#!/usr/bin/env bash
# The main job: a local cluster with a real node, the operator installed from deploy/ as a user installs
# it, a sample application in a Pod Security `restricted` namespace, one backup through its CronJob's
# template (the sidecar in the running Pod, a Job for the PVC), and a restore into a fresh namespace.
#   scripts/demo.sh        run it; the cluster stays up (the last line says how to reach it)
#   scripts/demo.sh down   stop everything it started
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

state=${STASH_DEMO_DIR:-${TMPDIR:-/tmp}/stash-demo}
export STASH_CLUSTER_DIR="$state/cluster"
# The image carries the debug binary cargo builds anyway; STASH_IMAGE_PROFILE=release packs a release one.
export STASH_IMAGE_PROFILE=${STASH_IMAGE_PROFILE:-dev}

if [[ ${1:-} == down ]]; then
  [[ -f "$state/rest-server.pid" ]] && kill "$(cat "$state/rest-server.pid")" 2>/dev/null || true
  tests/cluster/cluster.sh down
  rm -rf "$state"
  exit 0
fi

mkdir -p "$state"
echo "== cluster with a node"
exports=$(tests/cluster/cluster.sh up --node) # not inside eval, where a failed up would go unnoticed
eval "$exports"
bin=$(tests/cluster/build.sh)
kubectl() { "$bin/kubectl" "$@"; }
cargo build --quiet --bin stash
mapfile -t archives < <(tests/images/build.sh stash toolbox)
tests/cluster/cluster.sh import "${archives[@]}" >/dev/null

echo "== operator (kubectl apply -k deploy/overlays/test-node: deploy/ with the local image)"
kubectl apply --server-side --force-conflicts -k deploy/overlays/test-node >/dev/null
kubectl -n stash rollout status deployment/stash-operator --timeout 180s

echo "== the sample application and its BackupBatch"
tools=$(tests/backends/build.sh)
if ! [[ -f "$state/rest-server.pid" ]] || ! kill -0 "$(cat "$state/rest-server.pid")" 2>/dev/null; then
  rest_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  mkdir -p "$state/rest"
  "$tools/rest-server" --listen "$STASH_NODE_IP:$rest_port" --path "$state/rest" --no-auth >/dev/null 2>&1 &
  echo $! >"$state/rest-server.pid"
  echo "$rest_port" >"$state/rest-server.port"
fi
rest_port=$(cat "$state/rest-server.port")
for volume in demo-uploads demo-restore-uploads; do
  mkdir -p "$state/volumes/$volume" && chmod 0777 "$state/volumes/$volume"
done
# One namespace holds the application, the other receives the restore; both run on the test node and
# enforce Pod Security `restricted`.
namespace() {
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $1
  labels: {pod-security.kubernetes.io/enforce: restricted}
  annotations:
    scheduler.alpha.kubernetes.io/defaultTolerations: '[{"key": "stash.local/test-node", "operator": "Exists"}]'
---
apiVersion: v1
kind: Secret
metadata: {name: repo-secret, namespace: $1}
stringData: {RESTIC_PASSWORD: demo-only-password-change-me}
---
apiVersion: stash.appscode.com/v1alpha1
kind: Repository
metadata: {name: repo, namespace: $1}
spec:
  backend:
    rest: {url: "http://$STASH_NODE_IP:$rest_port/site"}
    storageSecretName: repo-secret
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $1-uploads}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: demo-manual
  hostPath: {path: "$state/volumes/$1-uploads", type: Directory}
  claimRef: {namespace: $1, name: uploads}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: uploads, namespace: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: demo-manual
  volumeName: $1-uploads
  resources: {requests: {storage: 1Gi}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $1}
spec:
  replicas: $2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {runAsNonRoot: true, runAsUser: 1000, fsGroup: 1000, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: app
          image: stash.local/toolbox:dev
          imagePullPolicy: Never
          command: [sh, -c, 'mkdir -p /data/site && echo "<h1>hello from the demo</h1>" > /data/site/index.html && head -c 3000000 /dev/urandom > /data/site/photo.jpg && exec sleep infinity']
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, persistentVolumeClaim: {claimName: uploads}}]
EOF
}
{
  namespace demo 1
  cat <<EOF
---
apiVersion: stash.appscode.com/v1beta1
kind: BackupBatch
metadata: {name: site, namespace: demo}
spec:
  repository: {name: repo}
  schedule: "0 * * * *"
  timeOut: 10m
  members:
    - target:
        alias: web
        ref: {apiVersion: apps/v1, kind: Deployment, name: web}
        paths: [/data]
        volumeMounts: [{name: data, mountPath: /data}]
  hooks:
    preBackup:
      exec: {command: [sh, -c, 'sync && date > /data/site/backed-up-at']}
      containerName: app
  retentionPolicy: {name: keep-last-5, keepLast: 5, prune: true}
EOF
} >"$state/demo.yaml"
kubectl apply -f "$state/demo.yaml" >/dev/null
kubectl -n demo wait --for=jsonpath='{.status.phase}'=Ready backupbatch/site --timeout 120s
kubectl -n demo rollout status deployment/web --timeout 180s

echo "== back up now (a Job from the trigger CronJob, as the schedule would start it)"
job="site-now-$(date +%s)"
kubectl -n demo create job "$job" --from=cronjob/stash-trigger-site >/dev/null
kubectl -n demo wait --for=condition=complete "job/$job" --timeout 120s >/dev/null
session=$(kubectl -n demo get backupsessions -o jsonpath='{.items[-1:].metadata.name}')
for _ in $(seq 1 180); do
  finalized=$(kubectl -n demo get backupsession "$session" \
    -o jsonpath='{.status.conditions[?(@.type=="SessionFinalized")].status}')
  [[ -n $finalized ]] && break
  sleep 1
done
kubectl get stash -n demo
echo
kubectl -n demo get pods -o custom-columns='POD:.metadata.name,CONTAINERS:.spec.containers[*].name,PHASE:.status.phase'
echo
target/debug/stash sessions site -n demo
echo
echo "The complete sessions recorded in the repository itself:"
mkdir -p "$state/secret"
echo -n demo-only-password-change-me >"$state/secret/RESTIC_PASSWORD"
STASH_RESTIC_BINARY="$tools/restic" target/debug/stash sessions site -n demo --from-repository --secret-dir "$state/secret"

echo
echo "== restore into a fresh namespace"
namespace demo-restore 0 | kubectl apply -f - >/dev/null
cat <<EOF | kubectl apply -f - >/dev/null
apiVersion: stash.appscode.com/v1beta1
kind: RestoreBatch
metadata: {name: clone, namespace: demo-restore}
spec:
  repository: {name: repo}
  restoreFrom: {namespace: demo, batch: site}
  members:
    - target:
        alias: web
        ref: {apiVersion: apps/v1, kind: Deployment, name: web}
        volumeMounts: [{name: data, mountPath: /data}]
EOF
kubectl -n demo-restore wait --for=jsonpath='{.status.phase}'=Succeeded restorebatch/clone --timeout 180s
kubectl get restorebatch -n demo-restore
if diff -r "$state/volumes/demo-uploads/site" "$state/volumes/demo-restore-uploads/site"; then
  echo "restored files are identical to the backed-up ones"
fi
echo
echo "The cluster, its node and the operator keep running:  export KUBECONFIG=$KUBECONFIG"
echo "Stop everything with:                                 scripts/demo.sh down"
