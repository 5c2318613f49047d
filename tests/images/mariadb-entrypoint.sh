#!/bin/sh
# Starts MariaDB 10.11 as the image's non-root user, creating the system tables on first start.
# Reads (first start only):
#   MARIADB_ROOT_PASSWORD  required: root's password, for root@localhost and root@'%' (any address)
#   MARIADB_DATABASE       a database to create (default: none)
# The data live in /var/lib/mysql/data: a subdirectory, so that a volume mounted at /var/lib/mysql,
# owned by root, can hold it. Arguments are passed on to mariadbd.
set -eu

datadir=/var/lib/mysql/data
# No /etc/mysql configuration: every setting is here, on the command line.
set -- --no-defaults --datadir="$datadir" --socket=/run/mysqld/mysqld.sock --bind-address=0.0.0.0 \
  --port=3306 --skip-name-resolve "$@"

# A string as an SQL literal: backslashes and single quotes escaped.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/\\\\'/g")"; }

if [ ! -d "$datadir/mysql" ]; then
  if [ -z "${MARIADB_ROOT_PASSWORD:-}" ]; then
    echo "mariadb-entrypoint: MARIADB_ROOT_PASSWORD is required to create the system tables in $datadir" >&2
    exit 1
  fi
  mkdir -p "$datadir"
  # --force --skip-name-resolve: a Pod's host name need not resolve, and the grants use addresses anyway.
  mariadb-install-db --no-defaults --datadir="$datadir" --auth-root-authentication-method=normal \
    --skip-test-db --skip-name-resolve --force >&2
  password=$(quote "$MARIADB_ROOT_PASSWORD")
  # Bootstrap mode reads SQL on stdin without networking: the password never reaches a command line.
  # printf, not echo: dash's echo would turn the escaped backslashes back into escapes.
  {
    # mariadb-install-db also makes root@127.0.0.1, root@::1 and root@<host name> without a password, which
    # would take precedence over root@'%' for those addresses: only root@localhost stays.
    printf '%s\n' "DELETE FROM mysql.global_priv WHERE User = 'root' AND Host <> 'localhost';"
    printf '%s\n' "DELETE FROM mysql.proxies_priv WHERE Host <> 'localhost';"
    printf '%s\n' "FLUSH PRIVILEGES;"
    printf '%s\n' "ALTER USER 'root'@'localhost' IDENTIFIED BY $password;"
    printf '%s\n' "CREATE USER 'root'@'%' IDENTIFIED BY $password;"
    printf '%s\n' "GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;"
    if [ -n "${MARIADB_DATABASE:-}" ]; then
      printf 'CREATE DATABASE `%s`;\n' "$(printf '%s' "$MARIADB_DATABASE" | sed 's/`/``/g')"
    fi
  } | mariadbd --no-defaults --datadir="$datadir" --bootstrap --skip-networking >&2
fi

exec mariadbd "$@"
