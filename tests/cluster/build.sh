#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd from the pinned modules in go.mod into a cache
# directory keyed by version; a second run finds them there and returns at once.
# Prints the directory holding the binaries.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$here/go.mod")
cache_root=${STASH_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stash-testcluster}
bin_dir="$cache_root/k8s-$k8s_version-etcd-$etcd_version"

if [[ -x "$bin_dir/kube-apiserver" && -x "$bin_dir/kube-controller-manager" && -x "$bin_dir/kubectl" && -x "$bin_dir/etcd" ]]; then
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: the go command is needed to build the control plane" >&2; exit 1; }
minor=$(echo "$k8s_version" | cut -d. -f2)
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor
  -X k8s.io/component-base/version.gitTreeState=clean"
staging="$bin_dir.partial"
mkdir -p "$staging"
cd "$here"
echo "build.sh: building Kubernetes $k8s_version and etcd $etcd_version into $bin_dir (first run only)" >&2
start=$SECONDS
go build -trimpath -pgo=off -ldflags "$ldflags" -o "$staging/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -pgo=off -ldflags "$ldflags" -o "$staging/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager >&2
go build -trimpath -pgo=off -ldflags "$ldflags" -o "$staging/kubectl" k8s.io/kubernetes/cmd/kubectl >&2
go build -trimpath -pgo=off -ldflags "-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3 >&2
rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
echo "build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin_dir"
