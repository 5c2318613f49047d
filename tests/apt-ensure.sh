#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet (idempotent; first run only).
# Several test scripts may call it at once: a lock serialises them, so dpkg's own lock is never contended.
set -euo pipefail

missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "apt-ensure.sh: missing Debian packages; install them as root: apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
exec 9>/run/lock/stash-apt-ensure.lock
flock 9
echo "apt-ensure.sh: installing ${missing[*]} (first run only)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
