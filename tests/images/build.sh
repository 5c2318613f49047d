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

usage() { echo "usage: $0 pause|toolbox|stash|postgres|mariadb|cert-manager-{controller,cainjector,webhook} ..." >&2; exit 2; }
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

# Writes a Debian root filesystem tarball of mmdebstrap variant $2 with the packages of list file $3 (plus
# more mmdebstrap options, one per line on stdin), cached; prints its path. Every image gets a non-root
# user that Pod Security "restricted" accepts: nonroot, 65532:65532, as distroless names it.
debian_rootfs() {
  local name=$1 variant=$2 list=$3
  local -a pkgs args
  mapfile -t pkgs < <(packages "$list")
  mapfile -t extra
  args=(
    --mode=unshare # a private mount namespace: nothing is left mounted on the host, even on failure
    --variant="$variant"
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr # merged /usr without the usrmerge package and its perl
    --include="$(IFS=,; echo "${pkgs[*]}")"
    # Documentation and translations only cost space in a container; the licences stay (as in Debian's slim images).
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/groff/*'
    --dpkgopt='path-exclude=/usr/share/lintian/*'
    --dpkgopt='path-exclude=/usr/share/linda/*'
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
    prune "rootfs-$name" "$out"
    log "$name: root filesystem in $((SECONDS - start)) s"
  fi
  echo "$out"
}

# Removes the cached builds named $1-KEY.tar other than $2: each is hundreds of MB, and a key once
# replaced only comes back by going back to older inputs.
prune() {
  local old
  for old in "$cache/$1"-*.tar; do
    [[ "$old" == "$2" || ! -f "$old" || "${old#"$cache/$1"-}" == *-* ]] || rm -f "$old" "$old.versions"
  done
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
    prune "$name" "$out"
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
  # essential: only the Essential:yes set (no apt, no init) plus the list.
  rootfs=$(debian_rootfs toolbox essential "$here/toolbox.packages" </dev/null)
  oci_archive toolbox --name stash.local/toolbox:dev --layer "$rootfs" \
    --user 65532:65532 --entrypoint /bin/sh --cmd=-c --cmd='sleep infinity' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env HOME=/home/nonroot --workdir /
}

# The operator, executor and sidecar image; the Dockerfile describes the same image (tests/image_parity.rs).
# minbase is what Debian's bookworm-slim image holds (Essential plus apt), the Dockerfile's base.
build_stash() {
  local target=${CARGO_TARGET_DIR:-$repo/target} restic_dir rootfs dir="$scratch/stash"
  rootfs=$(debian_rootfs stash minbase "$repo/image/stash.packages" </dev/null)
  # cargo decides whether the binary is stale; a fresh one costs a second. Run from a test, this script
  # inherits the test's CARGO_MANIFEST_DIR, CARGO_PKG_*, ...: build scripts that watch them (ring watches
  # CARGO_MANIFEST_DIR) would have cargo rebuild the whole release tree each time, so they are dropped.
  local var
  local -a unset=()
  for var in $(compgen -e); do
    case "$var" in
      CARGO_MANIFEST_* | CARGO_PKG_* | CARGO_BIN_EXE_* | CARGO_CRATE_NAME | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR) unset+=(-u "$var") ;;
    esac
  done
  # STASH_IMAGE_PROFILE=dev (scripts/test.sh) packs the debug binary the tests build anyway, stripped:
  # the same program, without a release build that would double a cold CI run's compile time.
  local profile=${STASH_IMAGE_PROFILE:-release} built
  case "$profile" in
    release) built=release ;;
    dev) built=debug ;;
    *) echo "build.sh: STASH_IMAGE_PROFILE must be release or dev, not $profile" >&2; exit 2 ;;
  esac
  log "stash: cargo build --profile $profile"
  (cd "$repo" && env "${unset[@]}" cargo build --profile "$profile" --locked --bin stash >&2)
  restic_dir=$("$here/../backends/build.sh")
  mkdir -p "$dir/usr/local/bin"
  install -m 0755 "$restic_dir/restic" "$dir/usr/local/bin/"
  strip -o "$dir/usr/local/bin/stash" "$target/$built/stash"
  chmod 0755 "$dir/usr/local/bin/stash"
  oci_archive stash --name stash.local/stash:dev --layer "$rootfs" --layer "$dir" \
    --user 65532:65532 --entrypoint /usr/local/bin/stash \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env HOME=/home/nonroot
}

# Database servers for end-to-end tests of database members, run as nonroot (Pod Security restricted):
# an entrypoint creates the data on the first start from environment variables (see the scripts).
build_postgres() {
  local rootfs dir="$scratch/postgres"
  # The package's own cluster (main) and its generated snakeoil key would only be dead weight that
  # differs per build. LLVM (105 MB) only serves the JIT, which the entrypoint turns off.
  rootfs=$(debian_rootfs postgres essential "$here/postgres.packages" <<'EOF'
--dpkgopt=path-exclude=/usr/lib/x86_64-linux-gnu/libLLVM-*
--dpkgopt=path-exclude=/usr/lib/postgresql/15/lib/llvmjit*
--dpkgopt=path-exclude=/usr/lib/postgresql/15/lib/bitcode/*
--customize-hook=rm -rf "$1/var/lib/postgresql/15" "$1/etc/postgresql/15"
--customize-hook=rm -f "$1/etc/ssl/private/ssl-cert-snakeoil.key" "$1/etc/ssl/certs/ssl-cert-snakeoil.pem"
--customize-hook=install -d -o 65532 -g 65532 -m 0700 "$1/var/lib/postgresql/data"
EOF
)
  install -D -m 0755 "$here/postgres-entrypoint.sh" "$dir/usr/local/bin/entrypoint"
  # The server runs as nonroot: its socket directory is its own (/run is not in mmdebstrap's tarball).
  install -d -o 65532 -g 65532 -m 0755 "$dir/run/postgresql"
  oci_archive postgres --name stash.local/postgres:dev --layer "$rootfs" --layer "$dir" \
    --user 65532:65532 --entrypoint /usr/local/bin/entrypoint \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env HOME=/home/nonroot --env PGDATA=/var/lib/postgresql/data/pgdata
}

build_mariadb() {
  local rootfs dir="$scratch/mariadb"
  # The system tables the package creates are replaced by the entrypoint's, owned by nonroot.
  rootfs=$(debian_rootfs mariadb essential "$here/mariadb.packages" <<'EOF'
--customize-hook=rm -rf "$1/var/lib/mysql"
--customize-hook=install -d -o 65532 -g 65532 -m 0700 "$1/var/lib/mysql"
EOF
)
  install -D -m 0755 "$here/mariadb-entrypoint.sh" "$dir/usr/local/bin/entrypoint"
  install -d -o 65532 -g 65532 -m 0755 "$dir/run/mysqld"
  oci_archive mariadb --name stash.local/mariadb:dev --layer "$rootfs" --layer "$dir" \
    --user 65532:65532 --entrypoint /usr/local/bin/entrypoint \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env HOME=/home/nonroot
}

# One of cert-manager's commands (tests/cluster/build.sh cert-manager: static Go programs), alone in its
# image as in upstream's distroless ones, tagged with the release the chart names.
build_cert_manager() {
  local command=$1 built dir="$scratch/cert-manager-$1" version
  built=$("$here/../cluster/build.sh" cert-manager)
  version=$(sed -n 's/^appVersion: //p' "$built/chart/Chart.yaml")
  install -D -m 0755 "$built/$command" "$dir/app/cmd/$command"
  oci_archive "cert-manager-$command" --name "stash.local/cert-manager-$command:$version" --layer "$dir" \
    --user 65532:65532 --entrypoint "/app/cmd/$command"
}

for image in "$@"; do
  start=$SECONDS
  case "$image" in
    pause) build_pause ;;
    toolbox) build_toolbox ;;
    stash) build_stash ;;
    postgres) build_postgres ;;
    mariadb) build_mariadb ;;
    cert-manager-controller | cert-manager-cainjector | cert-manager-webhook) build_cert_manager "${image#cert-manager-}" ;;
    *) usage ;;
  esac
  log "$image: ready in $((SECONDS - start)) s"
done
