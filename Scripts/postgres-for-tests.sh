#!/usr/bin/env bash
# Starts a PostgreSQL server for Parley Work's tests: its own data directory, loopback only,
# trust authentication for a database `parley` of the user `parley`. Prints the URL to use as
# PARLEY_TEST_POSTGRES. Runs the server as the `postgres` user when started as root.
#
#   Scripts/postgres-for-tests.sh start [DIR] [PORT]   (default /tmp/parley-postgres, 25432)
#   Scripts/postgres-for-tests.sh stop  [DIR]
set -euo pipefail
action=${1:-start}
dir=${2:-/tmp/parley-postgres}
port=${3:-25432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "postgres-for-tests: PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$action" in
start)
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" = 0 ] && chown postgres: "$dir"
        as_postgres "$bin/initdb" -D "$dir" -A trust -U postgres --no-sync >/dev/null
    fi
    if ! as_postgres "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
        as_postgres "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300" start >/dev/null
    fi
    as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'parley'" | grep -q 1 ||
        as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE ROLE parley LOGIN CREATEDB"
    as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'parley'" | grep -q 1 ||
        as_postgres "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE parley OWNER parley"
    echo "postgres://parley@127.0.0.1:$port/parley"
    ;;
stop)
    as_postgres "$bin/pg_ctl" -D "$dir" -m fast stop >/dev/null
    ;;
*)
    echo "usage: $0 start|stop [DIR] [PORT]" >&2; exit 2
    ;;
esac
