#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for tests and the demo: etcd, kube-apiserver and
# kube-controller-manager, built from pinned Go modules by build.sh. No kubelet: Pods stay Pending.
#
#   cluster.sh up          build if needed, start (or reuse) the cluster, print `export KUBECONFIG=...`
#   cluster.sh down        stop every process and remove the cluster's state
#   cluster.sh kubeconfig  print the admin kubeconfig's path
#   cluster.sh status      print each process's state and the API server's /readyz
# With STASH_CLUSTER_AUDIT=1, the API server writes an audit log of every request (user agent, verb)
# to <state>/audit.log, for benchmarks that count requests by client.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${STASH_CLUSTER_DIR:-${TMPDIR:-/tmp}/stash-testcluster}
kubeconfig="$state/admin.kubeconfig"
components=(etcd kube-apiserver kube-controller-manager)
controllers=deployment,replicaset,statefulset,daemonset,job,cronjob,garbagecollector,namespace,serviceaccount,root-ca-cert-publisher

log() { echo "cluster.sh: $*" >&2; }

running() {
  local pid_file="$state/$1.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

api_ready() {
  [[ -f "$kubeconfig" ]] && [[ "$(kubectl_raw /readyz 2>/dev/null)" == "ok" ]]
}

# Talks to the API server with the admin client certificate; curl keeps kubectl optional.
kubectl_raw() {
  curl -sf --max-time 5 --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" \
    --key "$state/pki/admin.key" "https://127.0.0.1:$(cat "$state/apiserver.port")$1"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

gen_pki() {
  local pki="$state/pki"
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=stash-test-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  leaf() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf '%s\n' "$3") -out "$pki/$1.crt" 2>/dev/null
  }
  leaf apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth"
  leaf admin "/O=system:masters/CN=stash-test-admin" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() {
  cat >"$kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stash-test
  cluster:
    server: https://127.0.0.1:$1
    certificate-authority: $state/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $state/pki/admin.crt
    client-key: $state/pki/admin.key
contexts:
- name: stash-test
  context: {cluster: stash-test, user: admin, namespace: default}
current-context: stash-test
EOF
}

start() { # name args...
  local name=$1
  shift
  setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
}

wait_for() { # what seconds command...
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      log "$what did not become ready; last log lines:"
      tail -n 20 "$state"/*.log >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

up() {
  if running kube-apiserver && running etcd && running kube-controller-manager && api_ready; then
    echo "export KUBECONFIG=$kubeconfig"
    return 0
  fi
  down_quietly
  local bin etcd_port peer_port api_port
  bin=$("$here/build.sh")
  mkdir -p "$state"
  gen_pki
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  echo "$api_port" >"$state/apiserver.port"
  write_kubeconfig "$api_port"

  start etcd "$bin/etcd" --name stash-test --data-dir "$state/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "stash-test=http://127.0.0.1:$peer_port" --log-level warn
  wait_for etcd 30 curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"

  local audit=()
  if [[ ${STASH_CLUSTER_AUDIT:-} == 1 ]]; then
    printf 'apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n' >"$state/audit-policy.yaml"
    audit=(--audit-policy-file "$state/audit-policy.yaml" --audit-log-path "$state/audit.log")
  fi
  start kube-apiserver "$bin/kube-apiserver" "${audit[@]}" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$state/pki/apiserver.crt" --tls-private-key-file "$state/pki/apiserver.key" \
    --client-ca-file "$state/pki/ca.crt" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$state/pki/sa.pub" --service-account-signing-key-file "$state/pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --authorization-mode RBAC --allow-privileged=true \
    --cert-dir "$state/pki" --profiling=false --v=1
  wait_for kube-apiserver 120 api_ready

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$kubeconfig" --controllers "$controllers" \
    --leader-elect=false --use-service-account-credentials=false \
    --secure-port 0 --root-ca-file "$state/pki/ca.crt" \
    --service-account-private-key-file "$state/pki/sa.key" --v=1
  wait_for "namespace default" 60 kubectl_raw /api/v1/namespaces/default/serviceaccounts/default >/dev/null
  log "ready (API server https://127.0.0.1:$api_port)"
  echo "export KUBECONFIG=$kubeconfig"
}

down_quietly() {
  local name pid
  for name in "${components[@]}"; do
    [[ -f "$state/$name.pid" ]] || continue
    pid=$(cat "$state/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for name in "${components[@]}"; do
    [[ -f "$state/$name.pid" ]] || continue
    pid=$(cat "$state/$name.pid")
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$state"
}

status() {
  local name
  for name in "${components[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if api_ready; then echo "readyz: ok"; else echo "readyz: not ready"; fi
}

case "${1:-}" in
  up) up ;;
  down) down_quietly ;;
  kubeconfig) echo "$kubeconfig" ;;
  status) status ;;
  *)
    echo "usage: $0 up|down|kubeconfig|status" >&2
    exit 2
    ;;
esac
