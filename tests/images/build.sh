#!/usr/bin/env bash
# Builds the test cluster's container images as OCI archives, without a registry or a Docker engine:
# Debian bookworm root filesystems from mmdebstrap, plus the project's own binaries as a second layer.
#
#   tests/images/build.sh pause toolbox ...
#
# Prints one archive path per image named, in order, on stdout (logs go to stderr). `ctr images import`
# takes each image's name from the archive. Each archive is cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/stash-images/, keyed by everything that goes into it, so a second run
# returns at once. The Debian part is keyed by the package list, the mmdebstrap options and the Debian
# release files this machine last fetched (`apt-get update` moves it to newer packages).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/stash-images
suite=bookworm

usage() { echo "usage: $0 pause|toolbox ..." >&2; exit 2; }
(($#)) || usage
log() { echo "images/build.sh: $*" >&2; }
# A short key for whatever is on stdin.
digest() { sha256sum | cut -c1-20; }
# The hash of a file's content, with its name so that a renamed input changes the key too.
file_key() { local f; for f in "$@"; do printf '%s %s\n' "${f#"$repo/"}" "$(sha256sum <"$f" | cut -d' ' -f1)"; done; }
# The packages named in a list file: one per line, `#` starts a comment.
packages() { sed 's/#.*//' "$1" | tr -s ' \t' '\n\n' | sed '/^$/d'; }

mkdir -p "$cache"
# One build at a time, here and in other processes (tests may ask for the same image at once; 2 cores).
exec {lock}>"$cache/.lock"
flock "$lock"
scratch=$(mktemp -d "$cache/.work.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# The Debian package indexes this machine knows; mmdebstrap resolves against the same archive.
debian_state() {
  local releases=(/var/lib/apt/lists/*_dists_"$suite"*_InRelease)
  if [[ ! -e "${releases[0]}" ]]; then
    apt-get update -q >&2 # a fresh machine: apt has never run
    releases=(/var/lib/apt/lists/*_dists_"$suite"*_InRelease)
  fi
  # Their dates and index hashes identify a snapshot of the archive.
  cat "${releases[@]}" | digest
}

# Writes a Debian root filesystem tarball with the packages of list file $2 (plus `extra` lines from
# stdin: mmdebstrap options), cached; prints its path. Every image runs as a non-root user that
# Pod Security "restricted" accepts: nonroot, 65532:65532, as distroless names it.
debian_rootfs() {
  local name=$1 list=$2
  local -a pkgs args
  mapfile -t pkgs < <(packages "$list")
  mapfile -t extra
  args=(
    --mode=unshare # a private mount namespace: nothing is left mounted on the host, even on failure
    --variant=essential # only Essential:yes packages plus the list: no apt, no init in the image
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr # merged /usr without the usrmerge package and its perl
    --include="$(IFS=,; echo "${pkgs[*]}")"
    # Documentation and translations only cost space in a container; the licences stay.
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --customize-hook='echo "nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin" >>"$1/etc/passwd"'
    --customize-hook='echo "nonroot:x:65532:" >>"$1/etc/group"'
    --customize-hook='mkdir -m 0755 "$1/home/nonroot" && chown 65532:65532 "$1/home/nonroot"'
    # Logs and caches of the build itself, and ids that must differ per machine, not per image.
    --customize-hook='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old'
    --customize-hook='rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"'
    "${extra[@]}"
  )
  local key
  key=$( { printf '%s\n' "$suite" "${args[@]}"; debian_state; } | digest)
  local out="$cache/rootfs-$name-$key.tar"
  if [[ ! -f "$out" ]]; then
    log "$name: mmdebstrap $suite with ${pkgs[*]} (first run only)"
    local start=$SECONDS
    "$here/../apt-ensure.sh" mmdebstrap
    # SOURCE_DATE_EPOCH: the same packages give the same tarball (file times clamped, no random ids).
    # Its chatter goes to a log that is shown only when it fails.
    if ! SOURCE_DATE_EPOCH=0 mmdebstrap "${args[@]}" "$suite" "$scratch/rootfs.tar" >"$scratch/mmdebstrap.log" 2>&1; then
      cat "$scratch/mmdebstrap.log" >&2
      exit 1
    fi
    # The installed versions, for the report and for tests that compare images (from the tarball's dpkg status).
    tar -xOf "$scratch/rootfs.tar" ./var/lib/dpkg/status |
      awk '/^Package:/ { p = $2 } /^Version:/ { print p "=" $2 }' | sort >"$out.versions"
    mv "$scratch/rootfs.tar" "$out"
    log "$name: root filesystem in $((SECONDS - start)) s"
  fi
  echo "$out"
}

# Writes the archive `$cache/$name-$key.tar` from the oci.py arguments that follow, unless it is there.
# The key covers oci.py's arguments, the content of every layer named and oci.py itself.
oci_archive() {
  local name=$1; shift
  local key layer
  key=$( {
    printf '%s\n' "$@"
    file_key "$here/oci.py"
    local previous=
    for layer in "$@"; do
      # A layer tar is named by its own key; a layer directory is keyed by its content, modes and owners.
      if [[ "$previous" == --layer && -d "$layer" ]]; then
        (cd "$layer" && find . -printf '%p %m %U:%G %l\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
      fi
      previous=$layer
    done
  } | sed "s|$scratch|SCRATCH|g" | digest)
  local out="$cache/$name-$key.tar"
  if [[ ! -f "$out" ]]; then
    log "$name: writing $out"
    python3 "$here/oci.py" --out "$scratch/image.tar" "$@"
    mv "$scratch/image.tar" "$out"
  fi
  echo "$out"
}

# A static Go program as the Pod sandbox's first process; no libc, no shell, nothing else in the image.
build_pause() {
  local dir="$scratch/pause"
  mkdir -p "$dir"
  # Reproducible: no paths, no build ids, no cgo; the key then changes only with the source or the Go release.
  (cd "$here/pause" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod go build -trimpath -buildvcs=false \
    -ldflags '-s -w -buildid=' -o "$dir/pause" .)
  oci_archive pause --name stash.local/pause:dev --layer "$dir" \
    --user 65535:65535 --entrypoint /pause
}

# A small Debian shell for tests to look around in a Pod: coreutils (sha256sum), curl, nc, ps.
build_toolbox() {
  local rootfs
  rootfs=$(debian_rootfs toolbox "$here/toolbox.packages" </dev/null)
  oci_archive toolbox --name stash.local/toolbox:dev --layer "$rootfs" \
    --user 65532:65532 --entrypoint /bin/sh --cmd=-c --cmd='sleep infinity' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env HOME=/home/nonroot --workdir /
}

for image in "$@"; do
  start=$SECONDS
  case "$image" in
    pause) build_pause ;;
    toolbox) build_toolbox ;;
    *) usage ;;
  esac
  log "$image: ready in $((SECONDS - start)) s"
done
