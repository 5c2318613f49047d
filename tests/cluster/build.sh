#!/usr/bin/env bash
# Builds the test cluster's binaries from pinned Go modules into cache directories keyed by version; a second
# run finds them there and returns at once. Prints the directory holding the binaries, and nothing else, on stdout.
#
#   build.sh        kube-apiserver, kube-controller-manager, kubectl and etcd (go.mod beside this file)
#   build.sh node   kubelet, kube-scheduler and kube-proxy (same module) and CoreDNS (its own module, coredns/),
#                   for `cluster.sh up --node`; builds the control plane first when it is missing
#   build.sh helm   helm (its own module, helm/), for the chart tests
#   build.sh promtool  promtool (its own module, promtool/), for the monitoring tests' rule checks
#   build.sh cert-manager  cert-manager's controller, CA injector and webhook (its own module, cert-manager/),
#                   and its Helm chart with its CRDs from the same module (chart/), for the certificate tests
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The version of module $1 required in $2/go.mod (either `require m v` or a line of a require block).
modver() { awk -v m="$1" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' "$2/go.mod"; }
k8s_version=$(modver k8s.io/kubernetes "$here")
etcd_version=$(modver go.etcd.io/etcd/server/v3 "$here")
coredns_version=$(modver github.com/coredns/coredns "$here/coredns")
helm_version=$(modver helm.sh/helm/v3 "$here/helm")
prometheus_version=$(modver github.com/prometheus/prometheus "$here/promtool")
cert_manager_version=$(modver github.com/cert-manager/cert-manager "$here/cert-manager")
cache_root=${STASH_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stash-testcluster}
cp_dir="$cache_root/k8s-$k8s_version-etcd-$etcd_version"
node_dir="$cache_root/node-k8s-$k8s_version-coredns-$coredns_version"
helm_dir="$cache_root/helm-$helm_version"
# Built without Prometheus's service-discovery plugins (cloud SDKs the rule checks never use): about
# a quarter of the cold build time. The suffix keeps a full build from an older cache apart.
promtool_dir="$cache_root/promtool-$prometheus_version-nosd"
cert_manager_dir="$cache_root/cert-manager-$cert_manager_version"

case "${1:-}" in
  "") bin_dir=$cp_dir wanted=(kube-apiserver kube-controller-manager kubectl etcd) ;;
  node) bin_dir=$node_dir wanted=(kubelet kube-scheduler kube-proxy coredns) ;;
  helm) bin_dir=$helm_dir wanted=(helm) ;;
  promtool) bin_dir=$promtool_dir wanted=(promtool) ;;
  cert-manager) bin_dir=$cert_manager_dir wanted=(controller cainjector webhook chart) ;;
  *)
    echo "usage: $0 [node|helm|promtool|cert-manager]" >&2
    exit 2
    ;;
esac

built() {
  local name
  for name in "${wanted[@]}"; do [[ -x "$bin_dir/$name" ]] || return 1; done
}
if built; then
  echo "$bin_dir"
  exit 0
fi
# The node binaries share most packages with the control plane's: building both at once (two scripts racing)
# compiles those packages twice, so the control plane always comes first, in this process.
if [[ $bin_dir == "$node_dir" ]]; then
  "${BASH_SOURCE[0]}" >/dev/null
fi

command -v go >/dev/null || { echo "build.sh: the go command is needed to build the test cluster" >&2; exit 1; }
minor=$(echo "$k8s_version" | cut -d. -f2)
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor
  -X k8s.io/component-base/version.gitTreeState=clean"
k8s() { go build -trimpath -pgo=off -ldflags "$ldflags" -o "$staging/$1" "k8s.io/kubernetes/cmd/$1" >&2; }
staging="$bin_dir.partial"
mkdir -p "$staging"
cd "$here"
start=$SECONDS
if [[ $bin_dir == "$cp_dir" ]]; then
  echo "build.sh: building Kubernetes $k8s_version and etcd $etcd_version into $bin_dir (first run only)" >&2
  k8s kube-apiserver
  k8s kube-controller-manager
  k8s kubectl
  go build -trimpath -pgo=off -ldflags "-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3 >&2
elif [[ $bin_dir == "$helm_dir" ]]; then
  echo "build.sh: building helm $helm_version into $bin_dir (first run only)" >&2
  # Upstream's Makefile flags: its version, and the Kubernetes version `helm template` and `helm lint` assume
  # (the minor of the client-go it links).
  client_go_minor=$(modver k8s.io/client-go "$here/helm" | cut -d. -f2)
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$client_go_minor
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$client_go_minor"
  (cd helm && go build -trimpath -ldflags "$helm_ldflags" -o "$staging/helm" helm.sh/helm/v3/cmd/helm >&2)
elif [[ $bin_dir == "$promtool_dir" ]]; then
  echo "build.sh: building promtool of Prometheus module $prometheus_version into $bin_dir (first run only)" >&2
  (cd promtool && go build -tags remove_all_sd -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$prometheus_version" \
    -o "$staging/promtool" github.com/prometheus/prometheus/cmd/promtool >&2)
elif [[ $bin_dir == "$cert_manager_dir" ]]; then
  echo "build.sh: building cert-manager $cert_manager_version into $bin_dir (first run only)" >&2
  cm_ldflags="-s -w -X github.com/cert-manager/cert-manager/pkg/util.AppVersion=$cert_manager_version"
  for command in controller cainjector webhook; do
    (cd cert-manager && go build -trimpath -ldflags "$cm_ldflags" -o "$staging/$command" \
      "github.com/cert-manager/cert-manager/cmd/$command" >&2)
  done
  # The chart as cert-manager's release tooling makes it: the version filled in, the CRDs among its templates.
  source_dir=$(cd cert-manager && go mod download -json github.com/cert-manager/cert-manager | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  cp -r "$source_dir/deploy/charts/cert-manager" "$staging/chart"
  chmod -R u+w "$staging/chart"
  sed -e "s/v0\.1\.0/$cert_manager_version/" -e 's/{{IS_PRERELEASE}}/false/' "$staging/chart/Chart.template.yaml" >"$staging/chart/Chart.yaml"
  rm "$staging/chart/Chart.template.yaml"
  for crd in "$source_dir"/deploy/crds/crd-*.yaml; do
    echo ---
    cat "$crd"
  done >"$staging/chart/templates/crds.yaml"
else
  echo "build.sh: building kubelet, kube-scheduler, kube-proxy $k8s_version and CoreDNS $coredns_version into $bin_dir (first run only)" >&2
  k8s kubelet
  k8s kube-scheduler
  k8s kube-proxy
  (cd coredns && go build -trimpath -ldflags "-s -w" -o "$staging/coredns" . >&2)
fi
rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
echo "build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin_dir"
