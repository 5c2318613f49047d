#!/bin/sh
# Starts PostgreSQL 15 as the image's non-root user, creating the cluster on first start.
# Reads (first start only, except PGDATA):
#   POSTGRES_PASSWORD  required: the superuser's password (password auth, scram-sha-256, from any address)
#   POSTGRES_USER      the superuser's name (default postgres)
#   POSTGRES_DB        a database to create besides `postgres` (default: none)
#   PGDATA             the cluster's directory (default /var/lib/postgresql/data/pgdata: a subdirectory,
#                      so that a volume mounted at /var/lib/postgresql/data, owned by root, can hold it)
set -eu

bin=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
export PGDATA

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: POSTGRES_PASSWORD is required to create the cluster in $PGDATA" >&2
    exit 1
  fi
  user=${POSTGRES_USER:-postgres}
  mkdir -p "$PGDATA"
  chmod 0700 "$PGDATA" # postgres refuses a data directory that others can read
  # The password goes through a pipe: never on a command line, never in a file.
  printf '%s\n' "$POSTGRES_PASSWORD" | "$bin/initdb" --username="$user" --pwfile=/dev/stdin \
    --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --locale=C.UTF-8 >&2
  # Password auth from anywhere (Pods), not only from loopback as initdb writes it.
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
  # The image has no LLVM: no JIT.
  printf "listen_addresses = '*'\njit = off\n" >>"$PGDATA/postgresql.conf"
  if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != postgres ]; then
    # Single-user mode: no server to start and stop for one statement. Double quotes in the name are doubled.
    printf 'CREATE DATABASE "%s";\n' "$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')" |
      "$bin/postgres" --single -D "$PGDATA" -j postgres >/dev/null
  fi
fi

exec "$bin/postgres" -D "$PGDATA" "$@"
