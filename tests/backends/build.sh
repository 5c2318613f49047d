#!/usr/bin/env bash
# Builds the data-path test tools from the pinned modules beside this file (one module per tool, so each binary
# gets exactly upstream's own dependency versions): restic, rest-server and versitygw (an S3 server, Apache-2.0),
# into a cache directory keyed by their versions; a second run finds them there and returns at once.
# Also makes sure a PostgreSQL server and client (initdb, pg_ctl, postgres, pg_dump, psql) are installed.
# Prints the directory holding the binaries, and nothing else, on stdout; logs go to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The version of module $1 required in $2/go.mod (either `require m v` or a line of a require block).
modver() { awk -v m="$1" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' "$here/$2/go.mod"; }
restic_version=$(modver github.com/restic/restic restic)
rest_server_version=$(modver github.com/restic/rest-server rest-server)
versitygw_version=$(modver github.com/versity/versitygw versitygw)
cache_root=${STASH_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stash-backends}
bin_dir="$cache_root/restic-$restic_version-rest-server-$rest_server_version-versitygw-$versitygw_version"

# The restic the tests drive must be the one the image ships.
dockerfile="$here/../../Dockerfile"
if [[ -f "$dockerfile" ]]; then
  image_restic=$(sed -n 's/^ARG RESTIC_VERSION=//p' "$dockerfile")
  if [[ "$image_restic" != "$restic_version" ]]; then
    echo "build.sh: Dockerfile pins restic $image_restic but tests/backends/restic/go.mod pins $restic_version" >&2
    exit 1
  fi
fi

# PostgreSQL: Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
pg_server_found() {
  local dir
  for dir in "" /usr/lib/postgresql/*/bin; do
    if [[ -z "$dir" ]]; then
      command -v initdb >/dev/null && command -v pg_ctl >/dev/null && command -v postgres >/dev/null && return 0
    elif [[ -x "$dir/initdb" && -x "$dir/pg_ctl" && -x "$dir/postgres" ]]; then
      return 0
    fi
  done
  return 1
}
pg_client_found() { command -v pg_dump >/dev/null && command -v psql >/dev/null; }
pg_server_found || "$here/../apt-ensure.sh" postgresql postgresql-client
pg_client_found || "$here/../apt-ensure.sh" postgresql-client

if [[ -x "$bin_dir/restic" && -x "$bin_dir/rest-server" && -x "$bin_dir/versitygw" ]]; then
  echo "$bin_dir"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: the go command is needed to build the backends" >&2; exit 1; }
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
staging="$bin_dir.partial"
mkdir -p "$staging"
echo "build.sh: building restic $restic_version, rest-server $rest_server_version and versitygw $versitygw_version into $bin_dir (first run only)" >&2
start=$SECONDS
# Same flags as the Dockerfile's restic.
(cd "$here/restic" && go build -trimpath -ldflags "-s -w" -o "$staging/restic" github.com/restic/restic/cmd/restic >&2)
(cd "$here/rest-server" && go build -trimpath -ldflags "-s -w" -o "$staging/rest-server" github.com/restic/rest-server/cmd/rest-server >&2)
(cd "$here/versitygw" && go build -trimpath -ldflags "-s -w -X main.Version=$versitygw_version" \
  -o "$staging/versitygw" github.com/versity/versitygw/cmd/versitygw >&2)
rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
echo "build.sh: built in $((SECONDS - start)) s" >&2
echo "$bin_dir"
