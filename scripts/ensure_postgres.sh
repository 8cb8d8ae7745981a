#!/usr/bin/env bash
# A throwaway PostgreSQL 15 server for the ledger's tests (tests/test_ledger.py): data in .pgdata/ of the
# checkout, listening on 127.0.0.1 only (port $EDGECOUPON_PG_PORT, default 55432, or the next free one
# when another server holds it; its unix socket inside the data directory), trust authentication for
# local connections, role and database `edgecoupon`.
# Prints the URL to use as EDGECOUPON_TEST_PG_URL on stdout, and nothing else there (messages go to
# stderr), so `url=$(bash scripts/ensure_postgres.sh)` works. Called by `make test` before pytest.
#
#   bash scripts/ensure_postgres.sh          start it (or say it already runs; a stale data dir is reused)
#   bash scripts/ensure_postgres.sh stop     stop it (the data dir stays; `rm -rf .pgdata` to forget it)
#
# The server binaries come from /usr/lib/postgresql/15/bin (installed with apt-get, as root, if missing).
# initdb refuses to run as root, so as root the server runs as the `postgres` user.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PGDATA="${EDGECOUPON_PGDATA:-$ROOT/.pgdata}"
PORT="${EDGECOUPON_PG_PORT:-55432}"
PGBIN="/usr/lib/postgresql/15/bin"

say() { echo "ensure_postgres: $*" >&2; }

# something already listens on 127.0.0.1:$1 (bash's /dev/tcp: no client tools needed)
port_busy() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

# the port of an existing data directory is the one its postgresql.conf names
configured_port() { sed -n 's/^port = \([0-9]*\).*/\1/p' "$PGDATA/postgresql.conf" 2> /dev/null | tail -n 1; }

url() { echo "postgresql://edgecoupon@127.0.0.1:${PORT}/edgecoupon"; }

# another server (another checkout's, say) may hold $PORT: move PORT to the next free one
free_port() {
    for _ in $(seq 100); do
        port_busy "$PORT" || return 0
        say "127.0.0.1:$PORT is taken; trying $((PORT + 1))"
        PORT=$((PORT + 1))
    done
    say "no free port near $PORT"
    exit 1
}

# as root the server runs as `postgres`, which must reach the data dir: a checkout under a private directory
# (e.g. /root, mode 700) cannot hold it, so it then lives in a per-checkout directory under /tmp instead.
# Called once the `postgres` user exists (the package creates it).
choose_pgdata() {
    if [ "$(id -u)" -eq 0 ] && [ -z "${EDGECOUPON_PGDATA:-}" ] && ! runuser -u postgres -- test -x "$ROOT"; then
        PGDATA="/tmp/edgecoupon-pgdata-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
    fi
    LOG="$PGDATA/server.log"
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo > /dev/null 2>&1; then
    SUDO="sudo"
fi

# run a server binary as the owner of the data directory: `postgres` when we are root, else ourselves
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install_postgres() {
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        say "$PGBIN is missing and not root: install postgresql-15"
        exit 1
    fi
    say "no PostgreSQL 15 in $PGBIN; installing it with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq >&2
    # Debian 12's `postgresql` is 15; name the version where the archive has it, for other releases
    if apt-cache show postgresql-15 > /dev/null 2>&1; then
        $SUDO apt-get install -y -qq --no-install-recommends postgresql-15 >&2
    else
        $SUDO apt-get install -y -qq --no-install-recommends postgresql >&2
    fi
    if [ ! -x "$PGBIN/pg_ctl" ]; then
        say "could not install PostgreSQL 15 (no $PGBIN/pg_ctl)"
        exit 1
    fi
}

running() {
    [ -f "$PGDATA/PG_VERSION" ] && as_owner "$PGBIN/pg_ctl" -D "$PGDATA" status > /dev/null 2>&1
}

if [ "${1:-start}" = "stop" ]; then
    if [ -x "$PGBIN/pg_ctl" ] && choose_pgdata && running; then
        as_owner "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop > /dev/null
        say "stopped the server of $PGDATA"
    else
        say "no server running on $PGDATA"
    fi
    exit 0
elif [ "${1:-start}" != "start" ]; then
    echo "usage: $0 [start|stop]" >&2
    exit 2
fi

[ -x "$PGBIN/pg_ctl" ] || install_postgres
choose_pgdata

if running; then
    PORT="$(configured_port)"
    say "already running ($PGDATA)"
    url
    exit 0
fi

if [ ! -f "$PGDATA/PG_VERSION" ]; then
    free_port
    say "creating a data directory in $PGDATA (port $PORT)"
    rm -rf "$PGDATA"  # a half-made one (initdb interrupted) would make initdb refuse
    mkdir -p "$PGDATA"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$PGDATA"
    fi
    chmod 700 "$PGDATA"
    # trust: a throwaway test server reachable only from this machine; no password to manage
    initdb_log="$(mktemp)"
    as_owner "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust --encoding=UTF8 --no-locale > "$initdb_log" 2>&1 ||
        { cat "$initdb_log" >&2; rm -f "$initdb_log"; exit 1; }
    rm -f "$initdb_log"
    # loopback only, the socket in the data directory (not /var/run/postgresql, which may not exist);
    # fsync stays on: the kill -9 test relies on committed decisions being durable
    cat >> "$PGDATA/postgresql.conf" <<EOF

# scripts/ensure_postgres.sh
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$PGDATA'
max_connections = 200
EOF
else
    PORT="$(configured_port)"
    if port_busy "$PORT"; then
        free_port
        echo "port = $PORT" >> "$PGDATA/postgresql.conf"  # the last setting wins
    fi
    say "reusing the data directory $PGDATA (port $PORT)"
fi

if [ "$(id -u)" -eq 0 ] && ! runuser -u postgres -- test -r "$PGDATA/PG_VERSION"; then
    say "user postgres cannot read $PGDATA (set EDGECOUPON_PGDATA to a directory it can reach)"
    exit 1
fi

if ! as_owner "$PGBIN/pg_ctl" -D "$PGDATA" -l "$LOG" -w -t 60 start > /dev/null; then
    say "the server did not start; the end of $LOG:"
    tail -n 20 "$LOG" >&2 || true
    exit 1
fi

psql_admin() {
    as_owner "$PGBIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"
}
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = 'edgecoupon'")" != "1" ]; then
    # CREATEDB: tests may create a database of their own
    psql_admin -c "CREATE ROLE edgecoupon LOGIN CREATEDB" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = 'edgecoupon'")" != "1" ]; then
    psql_admin -c "CREATE DATABASE edgecoupon OWNER edgecoupon" >&2
fi
say "PostgreSQL $(as_owner "$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT ($PGDATA)"
url
