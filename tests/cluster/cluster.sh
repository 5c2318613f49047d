#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for tests and the demo: etcd, kube-apiserver and
# kube-controller-manager, built from pinned Go modules by build.sh. Without --node there is no kubelet:
# Pods stay Pending. With --node, also one real node (one per machine): kube-scheduler, containerd, a CNI
# bridge, kube-proxy (iptables), CoreDNS and a kubelet, all host processes.
#
#   cluster.sh up [--node]        build if needed, start (or reuse) the cluster, print `export KUBECONFIG=...`
#                                 and `export STASH_WEBHOOK_CLIENT_CA=...` (the CA of the client certificate
#                                 the API server presents to every admission webhook; see gen_pki)
#                                 (with --node also `export STASH_NODE_IP=...`: Pods reach host servers there)
#   cluster.sh down               stop every process and undo every change to the host; safe to repeat
#   cluster.sh import ARCHIVE...  import OCI image archives into the node's containerd
#   cluster.sh images             list the node's images
#   cluster.sh verify-down        list what a node left on this machine; fails if anything (run after down)
#   cluster.sh kubeconfig         print the admin kubeconfig's path
#   cluster.sh status             print each process's state and the API server's /readyz
# The API server writes an audit log to <state>/audit.log: of the requests service accounts send to
# stash.appscode.com resources (tests count a sidecar's), or with STASH_CLUSTER_AUDIT=1 of every
# request (user agent, verb), for benchmarks that count requests by client.
#
# The node is tainted stash.local/test-node:NoSchedule, so the Pods of tests written for a cluster without
# a node stay Pending as before. A namespace opts in with the annotation
#   scheduler.alpha.kubernetes.io/defaultTolerations: '[{"key":"stash.local/test-node","operator":"Exists"}]'
# (PodTolerationRestriction adds it to every Pod created there, the operator's Jobs' included).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${STASH_CLUSTER_DIR:-${TMPDIR:-/tmp}/stash-testcluster}
kubeconfig="$state/admin.kubeconfig"
components=(etcd kube-apiserver kube-controller-manager)
controllers=deployment,replicaset,statefulset,daemonset,job,cronjob,garbagecollector,namespace,serviceaccount,root-ca-cert-publisher
# The node. Fixed names and subnets: there is one node per machine (it owns /kubepods, port 10250, the bridge).
node="$state/node"
node_name=stash-node
node_components=(kube-scheduler containerd kubelet kube-proxy coredns)
# What a node needs besides: untainting (nodelifecycle), Services (endpoint*), aggregated roles, volumes, Pod GC.
node_controllers=nodelifecycle,endpoint,endpointslice,endpointslicemirroring,clusterrole-aggregation,persistentvolume-binder,pv-protection,pvc-protection,ttl-after-finished,podgc
node_taint=stash.local/test-node
bridge=stash-br0
pod_cidr=10.213.0.0/24
node_ip=10.213.0.1 # the bridge's address: the kubelet refuses a loopback node IP
service_cidr=10.213.1.0/24
api_service_ip=10.213.1.1
dns_ip=10.213.1.10
node_owner=/run/stash-test-node # which state dir holds this machine's node
# Host settings the kubelet, kube-proxy and the bridge plugin change (ip_forward also flips accept_redirects):
# recorded at up, restored at down in this order.
node_sysctls=(net.ipv4.ip_forward net.ipv4.conf.all.accept_redirects vm.overcommit_memory kernel.panic kernel.panic_on_oops
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)
# Paths containerd, libcni and the kubelet write outside the state dir (hard-coded there); removed at down
# when up found them absent.
node_host_paths=(/run/containerd /run/netns /var/lib/cni /var/log/containers /var/lib/kubelet)
# kube-proxy and the kubelet need iptables, conntrack and runc, which live in sbin.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "cluster.sh: $*" >&2; }

# A zombie is dead: orphans are reparented to a PID 1 that may reap them only seconds later.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) && [[ ${stat##*) } != Z* ]]
}

running() {
  local pid_file="$state/$1.pid"
  [[ -f "$pid_file" ]] && alive "$(cat "$pid_file")"
}

mode() { cat "$state/mode" 2>/dev/null || echo none; }

api_ready() {
  [[ -f "$kubeconfig" ]] && [[ "$(kubectl_raw /readyz 2>/dev/null)" == "ok" ]]
}

# Talks to the API server with the admin client certificate; curl keeps kubectl optional.
kubectl_raw() {
  curl -sf --max-time 5 --cacert "$state/pki/ca.crt" --cert "$state/pki/admin.crt" \
    --key "$state/pki/admin.key" "https://$(cat "$state/apiserver.addr")$1"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

gen_pki() {
  local pki="$state/pki"
  mkdir -p "$pki"
  ca() { # name subject
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.crt" 2>/dev/null
  }
  leaf() { # name subject extensions [ca]
    local ca=${4:-ca}
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$1.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial -days 30 \
      -extfile <(printf '%s\n' "$3") -out "$pki/$1.crt" 2>/dev/null
  }
  ca ca "/CN=stash-test-ca"
  # What the API server presents to admission webhooks, from a CA of its own: a webhook trusting that CA
  # (stash operator --webhook-client-ca-file) admits the API server and no other client of the cluster.
  ca webhook-client-ca "/CN=stash-test-webhook-client-ca"
  leaf webhook-client "/CN=kube-apiserver-webhook-client" "extendedKeyUsage=clientAuth" webhook-client-ca
  leaf apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:$node_ip,IP:$api_service_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth"
  leaf admin "/O=system:masters/CN=stash-test-admin" "extendedKeyUsage=clientAuth"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  [[ $(mode) == node ]] || return 0
  # The names the API server's Node authorizer and bootstrap RBAC bindings expect.
  leaf kubelet "/O=system:nodes/CN=system:node:$node_name" "extendedKeyUsage=clientAuth"
  leaf kubelet-serving "/CN=$node_name" "subjectAltName=IP:$node_ip,DNS:$node_name
extendedKeyUsage=serverAuth"
  leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  leaf kube-scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  leaf kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
  leaf coredns "/CN=stash-test-coredns" "extendedKeyUsage=clientAuth"
}

# The API server's admission configuration: its webhook plugins present the webhook-client certificate
# to every webhook. The kubeconfig user "*" is the resolver's default for any webhook host (by service
# name or URL host:port) that has no entry of its own.
write_admission_config() {
  cat >"$state/webhook-client.kubeconfig" <<EOF
apiVersion: v1
kind: Config
users:
- name: "*"
  user:
    client-certificate: $state/pki/webhook-client.crt
    client-key: $state/pki/webhook-client.key
EOF
  cat >"$state/admission.yaml" <<EOF
apiVersion: apiserver.config.k8s.io/v1
kind: AdmissionConfiguration
plugins:
- name: MutatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $state/webhook-client.kubeconfig
- name: ValidatingAdmissionWebhook
  configuration:
    apiVersion: apiserver.config.k8s.io/v1
    kind: WebhookAdmissionConfiguration
    kubeConfigFile: $state/webhook-client.kubeconfig
EOF
}

write_kubeconfig() { # file client-cert-name
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stash-test
  cluster:
    server: https://$(cat "$state/apiserver.addr")
    certificate-authority: $state/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $state/pki/$2.crt
    client-key: $state/pki/$2.key
contexts:
- name: stash-test
  context: {cluster: stash-test, user: $2, namespace: default}
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

exports() {
  echo "export KUBECONFIG=$kubeconfig"
  echo "export STASH_WEBHOOK_CLIENT_CA=$state/pki/webhook-client-ca.crt"
  if [[ $(mode) == node ]]; then echo "export STASH_NODE_IP=$node_ip"; fi
}

node_running() {
  local name
  for name in "${node_components[@]}"; do running "$name" || return 1; done
}

up() { # [--node]
  local want=plain
  case "${1:-}" in
    "") ;;
    --node) want=node ;;
    *)
      echo "usage: $0 up [--node]" >&2
      exit 2
      ;;
  esac
  # A cluster started before the API server presented a webhook client certificate is started afresh.
  if running kube-apiserver && running etcd && running kube-controller-manager && api_ready &&
    [[ -f $state/admission.yaml ]]; then
    # A node cluster serves plain `up` too.
    case $(mode) in
      node) if node_running; then exports && return 0; fi ;;
      plain) if [[ $want == plain ]]; then exports && return 0; fi ;;
    esac
  fi
  down_quietly
  local bin node_bin="" api_host=127.0.0.1 etcd_port peer_port api_port
  bin=$("$here/build.sh")
  if [[ $want == node ]]; then
    "$here/../apt-ensure.sh" containerd runc containernetworking-plugins iptables conntrack
    node_bin=$("$here/build.sh" node)
    claim_node
    api_host=$node_ip # Pods reach the API server through kube-proxy, which cannot DNAT to loopback
  fi
  mkdir -p "$state"
  echo "$want" >"$state/mode"
  [[ $want == plain ]] || node_network_up
  gen_pki
  etcd_port=$(free_port)
  peer_port=$(free_port)
  api_port=$(free_port)
  echo "$api_host:$api_port" >"$state/apiserver.addr"
  write_kubeconfig "$kubeconfig" admin
  write_admission_config

  start etcd "$bin/etcd" --name stash-test --data-dir "$state/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "stash-test=http://127.0.0.1:$peer_port" --log-level warn
  wait_for etcd 30 curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"

  local extra=() kcm_controllers=$controllers rules
  if [[ ${STASH_CLUSTER_AUDIT:-} == 1 ]]; then
    rules='- level: Metadata'
  else
    # What tests count: the requests our executors and sidecars send to our resources.
    rules=$'- level: Metadata\n  userGroups: [system:serviceaccounts]\n  resources: [{group: stash.appscode.com}]\n- level: None'
  fi
  printf 'apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n%s\n' "$rules" >"$state/audit-policy.yaml"
  extra=(--audit-policy-file "$state/audit-policy.yaml" --audit-log-path "$state/audit.log")
  if [[ $want == plain ]]; then
    extra+=(--service-cluster-ip-range 10.0.0.0/24 --authorization-mode RBAC)
  else
    kcm_controllers+=,$node_controllers
    # Node authorization and client/serving certificates so that `kubectl logs/exec` reach the kubelet
    # verified; aggregator and webhook calls go to endpoints, not through ClusterIPs.
    extra+=(--service-cluster-ip-range "$service_cidr" --authorization-mode Node,RBAC
      --enable-admission-plugins NodeRestriction,PodTolerationRestriction
      --kubelet-client-certificate "$state/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "$state/pki/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$state/pki/ca.crt" --kubelet-preferred-address-types InternalIP
      --enable-aggregator-routing=true)
  fi
  start kube-apiserver "$bin/kube-apiserver" "${extra[@]}" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$api_host" --advertise-address "$api_host" --secure-port "$api_port" \
    --tls-cert-file "$state/pki/apiserver.crt" --tls-private-key-file "$state/pki/apiserver.key" \
    --client-ca-file "$state/pki/ca.crt" --admission-control-config-file "$state/admission.yaml" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$state/pki/sa.pub" --service-account-signing-key-file "$state/pki/sa.key" \
    --allow-privileged=true --cert-dir "$state/pki" --profiling=false --v=1
  wait_for kube-apiserver 120 api_ready

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$kubeconfig" --controllers "$kcm_controllers" \
    --leader-elect=false --use-service-account-credentials=false \
    --secure-port 0 --root-ca-file "$state/pki/ca.crt" \
    --service-account-private-key-file "$state/pki/sa.key" --v=1
  wait_for "namespace default" 60 kubectl_raw /api/v1/namespaces/default/serviceaccounts/default >/dev/null
  [[ $want == plain ]] || node_up "$bin" "$node_bin"
  log "ready (API server https://$api_host:$api_port)"
  exports
}

# Whether a process of the cluster under $1 lives: its `up` (still starting it) or a component.
cluster_alive() {
  local pid_file
  for pid_file in "$1"/*.pid; do
    [[ -f $pid_file ]] && alive "$(cat "$pid_file")" && return 0
  done
  return 1
}

# Refuses a second node on this machine (another state dir's). Takes over after a crash: when the owner's
# state is gone, or none of its processes lives (a restart kept its files, the CI machine's once did).
claim_node() {
  local owner
  mkdir -p "$state"
  echo $$ >"$state/up.pid"
  until (set -C && echo "$state" >"$node_owner") 2>/dev/null; do # noclobber: one of two racing ups wins
    owner=$(cat "$node_owner" 2>/dev/null || true)
    [[ $owner != "$state" ]] || return 0
    if [[ -n $owner && -d $owner ]]; then
      if cluster_alive "$owner"; then
        log "this machine's node belongs to $owner: run STASH_CLUSTER_DIR=$owner $0 down first"
        exit 1
      fi
      log "taking over this machine's node from $owner, none of whose processes lives"
      STASH_CLUSTER_DIR=$owner "$here/cluster.sh" down
    fi
    rm -f "$node_owner"
  done
}

# The bridge exists before anything starts: its address is the node IP the API server and kubelet bind.
node_network_up() {
  mkdir -p "$node"
  # Record what up changes on the host, before changing it.
  local key path
  for key in "${node_sysctls[@]}"; do
    [[ -e /proc/sys/${key//.//} ]] && echo "$key $(sysctl -n "$key")"
  done >"$node/sysctls.saved"
  for path in "${node_host_paths[@]}"; do
    [[ -e $path ]] || echo "$path"
  done >"$node/host-paths.created"
  python3 - "$pod_cidr" "$service_cidr" "$bridge" <<'EOF' || exit 1
import ipaddress, json, subprocess, sys
ours = [ipaddress.ip_network(n) for n in sys.argv[1:3]]
for route in json.loads(subprocess.run(["ip", "-j", "-4", "route"], capture_output=True, check=True).stdout):
    if route["dst"] == "default" or route.get("dev") == sys.argv[3]:
        continue
    if any(net.overlaps(ipaddress.ip_network(route["dst"], strict=False)) for net in ours):
        sys.exit(f"cluster.sh: the host routes {route['dst']}, which overlaps the node's subnets {sys.argv[1]} {sys.argv[2]}")
EOF
  ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
  ip addr replace "$node_ip/24" dev "$bridge"
  ip link set "$bridge" up
  # The host reaches ClusterIPs through kube-proxy's OUTPUT rules; this route keeps unanswered ones on the
  # bridge instead of the default route.
  ip route replace "$service_cidr" dev "$bridge"
  # Confinement: Pods have no default route (host-local routes only the service CIDR), nothing is forwarded
  # between the bridge and other interfaces, and the node's servers on $node_ip (API server, kubelet, CoreDNS)
  # answer only the host and the Pods.
  chain() { # table name rules...
    local table=$1 name=$2
    shift 2
    iptables -t "$table" -N "$name" 2>/dev/null || iptables -t "$table" -F "$name"
    local rule
    for rule in "$@"; do eval "iptables -t $table -A $name $rule"; done
  }
  chain filter STASH-NODE-FORWARD "-i $bridge -o $bridge -j RETURN" "-i $bridge -j DROP" "-o $bridge -j DROP"
  chain filter STASH-NODE-INPUT "-i lo -j RETURN" "-i $bridge -j RETURN" "-d $node_ip -j DROP"
  iptables -C FORWARD -j STASH-NODE-FORWARD 2>/dev/null || iptables -I FORWARD -j STASH-NODE-FORWARD
  iptables -C INPUT -j STASH-NODE-INPUT 2>/dev/null || iptables -I INPUT -j STASH-NODE-INPUT
}

node_up() { # control-plane-bin node-bin
  local bin=$1 node_bin=$2 kubectl=("$1/kubectl" --kubeconfig "$kubeconfig") archive
  local sock="$node/containerd.sock" proxy_port metrics_port ready_port
  mkdir -p "$node/cni"
  write_kubeconfig "$state/kube-scheduler.kubeconfig" kube-scheduler
  write_kubeconfig "$state/kubelet.kubeconfig" kubelet
  write_kubeconfig "$state/kube-proxy.kubeconfig" kube-proxy
  write_kubeconfig "$state/coredns.kubeconfig" coredns

  start kube-scheduler "$node_bin/kube-scheduler" --kubeconfig "$state/kube-scheduler.kubeconfig" \
    --leader-elect=false --secure-port 0 --v=1

  # containerd: own root, state, socket and runc root; no CAP_SYS_RESOURCE on the test machines, so
  # restrict_oom_score_adj (the CRI would give every sandbox -998, which runc then fails to set).
  cat >"$node/containerd.toml" <<EOF
version = 2
root = "$node/containerd"
state = "$node/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$node/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "stash.local/pause:dev"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni"
    max_conf_num = 1
EOF
  cat >"$node/cni/10-stash.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "stash-pods", "plugins": [{
  "type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]],
           "routes": [{"dst": "$service_cidr"}], "dataDir": "$node/cni-ipam"}}]}
EOF
  start containerd containerd --config "$node/containerd.toml"
  wait_for containerd 30 ctr -a "$sock" version
  for archive in $("$here/../images/build.sh" pause); do ctr -a "$sock" -n k8s.io images import "$archive" >&2; done

  cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $state/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $state/pki/kubelet-serving.crt
tlsPrivateKeyFile: $state/pki/kubelet-serving.key
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
resolvConf: ""
podLogsDir: $node/pod-logs
volumePluginDir: $node/volume-plugins
registerWithTaints: [{key: $node_taint, effect: NoSchedule}]
# Images are imported, never pulled: no image GC, and eviction only on a nearly full disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
shutdownGracePeriod: 0s
# Secret and ConfigMap volumes follow their objects on each Pod's periodic sync: every 20 s instead of
# the default minute, so the certificate rotation tests wait a third as long for kubelet. Their printed
# delays are this node's; with the default they measured 23-85 s (certs/README.md).
syncFrequency: 20s
EOF
  start kubelet "$node_bin/kubelet" --config "$node/kubelet.yaml" --kubeconfig "$state/kubelet.kubeconfig" \
    --root-dir "$node/kubelet" --node-ip "$node_ip" --hostname-override "$node_name" --v=1
  # Ready, and untainted of not-ready by the nodelifecycle controller: only then does a Pod schedule.
  node_schedulable() {
    [[ $("${kubectl[@]}" get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.spec.taints[*].key}') == "True $node_taint" ]]
  }
  wait_for "node $node_name" 60 node_schedulable

  proxy_port=$(free_port)
  metrics_port=$(free_port)
  # kube-proxy: leave conntrack limits and timeouts, oom_score_adj and route_localnet as they are;
  # masquerade Service traffic so replies of a Pod to a Pod on the bridge come back through the host's NAT.
  cat >"$node/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $node_name
bindAddress: $node_ip
clusterCIDR: $pod_cidr
healthzBindAddress: 127.0.0.1:$proxy_port
metricsBindAddress: 127.0.0.1:$metrics_port
nodePortAddresses: [$node_ip/32]
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
iptables: {masqueradeAll: true, localhostNodePorts: false, minSyncPeriod: 0s}
EOF
  start kube-proxy "$node_bin/kube-proxy" --config "$node/kube-proxy.yaml" --v=1
  wait_for kube-proxy 60 curl -sf --max-time 2 "http://127.0.0.1:$proxy_port/healthz"

  # CoreDNS on the node IP, behind the usual kube-dns ClusterIP (an EndpointSlice names the host).
  "${kubectl[@]}" apply -f - >&2 <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "stash-test:coredns"}
rules:
- {apiGroups: [""], resources: [services, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "stash-test:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "stash-test:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: stash-test-coredns}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $dns_ip
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: kube-dns-host, namespace: kube-system, labels: {kubernetes.io/service-name: kube-dns}}
addressType: IPv4
endpoints: [{addresses: ["$node_ip"], conditions: {ready: true}}]
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
EOF
  ready_port=$(free_port)
  cat >"$node/Corefile" <<EOF
.:53 {
    bind $node_ip
    errors
    ready 127.0.0.1:$ready_port
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $state/coredns.kubeconfig stash-test
        ttl 5
    }
}
EOF
  start coredns "$node_bin/coredns" -conf "$node/Corefile"
  wait_for coredns 60 curl -sf --max-time 2 "http://127.0.0.1:$ready_port/ready"
}

stop() { # name...: TERM each process group, then KILL what is left after 10 s
  local name pid
  for name in "$@"; do
    [[ -f "$state/$name.pid" ]] || continue
    pid=$(cat "$state/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for name in "$@"; do
    [[ -f "$state/$name.pid" ]] || continue
    pid=$(cat "$state/$name.pid")
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$state/$name.pid"
  done
}

# Pids whose command line has exactly the argument $1 (containerd's shims run in process groups of their own).
pids_with_arg() {
  local cmdline arg args
  for cmdline in /proc/[0-9]*/cmdline; do
    mapfile -d '' args 2>/dev/null <"$cmdline" || continue
    for arg in "${args[@]}"; do
      if [[ $arg == "$1" ]]; then
        cmdline=${cmdline#/proc/}
        echo "${cmdline%/cmdline}"
        break
      fi
    done
  done
}

# Unmounts everything below the given directories, deepest (latest) first.
unmount_below() {
  local dir mounts
  for _ in 1 2 3 4 5; do
    mounts=()
    for dir in "$@"; do
      mapfile -t -O "${#mounts[@]}" mounts < <(awk -v d="$dir/" 'substr($5, 1, length(d)) == d { print $5 }' /proc/self/mountinfo | tac)
    done
    ((${#mounts[@]})) || return 0
    for dir in "${mounts[@]}"; do umount "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null || true; done
  done
}

# Removes the rules and chains of the given prefixes (KUBE-*: the kubelet's and kube-proxy's) from every table.
drop_chains() { # regexp of chain names
  local cmd table rule chain
  for cmd in iptables ip6tables; do
    for table in filter nat mangle; do
      "$cmd-save" -t "$table" >/dev/null 2>&1 || continue
      # Jumps from the built-in chains first: a chain still referenced cannot be deleted.
      "$cmd-save" -t "$table" | { grep -E "^-A .* -j ($1)" || true; } | { grep -vE "^-A ($1)" || true; } |
        while read -r rule; do eval "$cmd -t $table -D ${rule#-A }" 2>/dev/null || true; done
      for chain in $("$cmd-save" -t "$table" | sed -nE "s/^:(($1)[^ ]*) .*/\1/p"); do "$cmd" -t "$table" -F "$chain"; done
      for chain in $("$cmd-save" -t "$table" | sed -nE "s/^:(($1)[^ ]*) .*/\1/p"); do "$cmd" -t "$table" -X "$chain"; done
    done
  done
}

node_stop() {
  local cgroups pid
  stop kubelet # first, so that it restarts nothing
  # Every Pod's processes, then containerd and the shims it leaves (they outlive it by design).
  cgroups=(/sys/fs/cgroup/*/kubepods)
  if [[ -d ${cgroups[0]} ]]; then
    find "${cgroups[@]}" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u | xargs -r kill -KILL 2>/dev/null || true
  fi
  stop containerd
  for pid in $(pids_with_arg "$node/containerd.sock"); do kill -KILL "$pid" 2>/dev/null || true; done
  stop coredns kube-proxy kube-scheduler
}

# After the API server has stopped: it binds the bridge's address until then.
node_clean() {
  local cgroups path key value created=()
  [[ -f $node/host-paths.created ]] && mapfile -t created <"$node/host-paths.created"
  unmount_below "$state" "${created[@]}"
  # The kubelet's cgroups (exited processes leave them a moment later).
  for _ in $(seq 1 25); do
    cgroups=(/sys/fs/cgroup/*/kubepods)
    [[ -d ${cgroups[0]} ]] || break
    find "${cgroups[@]}" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.2
  done
  ip link del "$bridge" 2>/dev/null || true # its addresses and routes go with it
  drop_chains 'KUBE-|STASH-NODE-'
  if [[ -f $node/sysctls.saved ]]; then
    while read -r key value; do sysctl -qw "$key=$value" || true; done <"$node/sysctls.saved"
  fi
  for path in "${created[@]}"; do rm -rf --one-file-system "$path"; done
  [[ $(cat "$node_owner" 2>/dev/null) != "$state" ]] || rm -f "$node_owner"
}

down_quietly() {
  [[ ! -d $node ]] || node_stop
  # etcd last: an API server that loses etcd first takes about 15 s more to exit.
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
  [[ ! -d $node ]] || node_clean
  unmount_below "$state"
  rm -rf --one-file-system "$state"
}

# What a node can leave behind, listed; fails if anything is.
verify_down() {
  local found=0 what
  report() { log "left behind: $*"; found=1; }
  [[ ! -e $state ]] || report "state dir $state"
  [[ ! -e $node_owner ]] || report "$node_owner ($(cat "$node_owner"))"
  ip link show "$bridge" >/dev/null 2>&1 && report "link $bridge"
  [[ -z $(ip route show "$service_cidr") ]] || report "route $service_cidr"
  what=$(awk -v d="$state/" 'substr($5, 1, length(d)) == d' /proc/self/mountinfo | wc -l)
  ((what == 0)) || report "$what mounts below $state"
  what=$(pids_with_arg "$node/containerd.sock" | wc -l)
  ((what == 0)) || report "$what containerd shims"
  what=$( (iptables-save; ip6tables-save) 2>/dev/null | grep -cE 'KUBE-|STASH-NODE-' || true)
  ((what == 0)) || report "$what iptables lines naming KUBE-* or STASH-NODE-* chains"
  what=$( (find /sys/fs/cgroup/*/kubepods -maxdepth 0 2>/dev/null || true) | wc -l)
  ((what == 0)) || report "kubepods cgroups in $what hierarchies"
  return "$found"
}

node_only() {
  if [[ $(mode) != node ]] || ! running containerd; then
    log "no node runs under $state: start one with $0 up --node"
    exit 1
  fi
}

status() {
  local name all=("${components[@]}")
  [[ $(mode) != node ]] || all+=("${node_components[@]}")
  for name in "${all[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$state/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if api_ready; then echo "readyz: ok"; else echo "readyz: not ready"; fi
}

case "${1:-}" in
  up) up "${@:2}" ;;
  down) down_quietly ;;
  import)
    node_only
    for archive in "${@:2}"; do ctr -a "$node/containerd.sock" -n k8s.io images import "$archive" >&2; done
    ;;
  images)
    node_only
    ctr -a "$node/containerd.sock" -n k8s.io images ls
    ;;
  verify-down) verify_down ;;
  kubeconfig) echo "$kubeconfig" ;;
  status) status ;;
  *)
    echo "usage: $0 up [--node]|down|import ARCHIVE...|images|verify-down|kubeconfig|status" >&2
    exit 2
    ;;
esac
