#!/usr/bin/env bash
# Packs the kubectl plugin for a release and writes its krew manifest with the archives' SHA256.
#
#   scripts/krew-release.sh VERSION RELEASE_URL HOMEPAGE AMD64_BINARY ARM64_BINARY OUT_DIR
#
# AMD64_BINARY and ARM64_BINARY are release builds of `kubectl-stash` for linux/amd64 and
# linux/arm64 (`cargo build --release --bin kubectl-stash`, on or for each architecture).
# OUT_DIR receives kubectl-stash-vVERSION-linux-{amd64,arm64}.tar.gz, to be uploaded under
# RELEASE_URL, and stash-batch.yaml, the manifest to commit to the krew index.
set -euo pipefail

[[ $# -eq 6 ]] || { sed -n '2,10p' "$0" >&2; exit 2; }
version=${1#v} release_url=${2%/} homepage=$3 amd64=$4 arm64=$5 out=$6
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

pack() { # pack ARCH BINARY: prints the archive's SHA256
  local arch=$1 binary=$2 stage archive
  stage=$(mktemp -d)
  install -m 0755 "$binary" "$stage/kubectl-stash"
  archive="$out/kubectl-stash-v$version-linux-$arch.tar.gz"
  # Reproducible: fixed owner, order and times.
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -czf "$archive" kubectl-stash
  rm -rf "$stage"
  sha256sum "$archive" | cut -d' ' -f1
}

sha_amd64=$(pack amd64 "$amd64")
sha_arm64=$(pack arm64 "$arm64")
sed -e "s|__VERSION__|$version|g" -e "s|__RELEASE_URL__|$release_url|g" -e "s|__HOMEPAGE__|$homepage|g" \
  -e "s|__SHA256_LINUX_AMD64__|$sha_amd64|" -e "s|__SHA256_LINUX_ARM64__|$sha_arm64|" \
  "$repo/deploy/krew/stash-batch.yaml" >"$out/stash-batch.yaml"
if grep -q '__[A-Z0-9_]*__' "$out/stash-batch.yaml"; then
  echo "krew-release: placeholders left in $out/stash-batch.yaml" >&2
  exit 1
fi
echo "$out/stash-batch.yaml"
