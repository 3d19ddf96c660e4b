#!/usr/bin/env bash
# Start a local PostgreSQL cluster for a normablate sweep and print the --storage URL to use.
#
#   scripts/start_postgres.sh [DATA_DIR] [PORT]          # defaults: /var/tmp/normablate-pg-PORT, 5432
#   normablate sweep --config SPEC --storage "$(scripts/start_postgres.sh | tail -n 1)"
#
# Re-running it on the same DATA_DIR starts the existing cluster again (the study is kept). The server binaries
# come from $NORMABLATE_PG_BIN or /usr/lib/postgresql/15/bin. PostgreSQL refuses to run as root, so as root the
# cluster belongs to the `postgres` user (via runuser); DATA_DIR must then be a place that user can reach.
# Access: by default only this machine (127.0.0.1). For workers on other machines set NORMABLATE_PG_ALLOW to
# their network, e.g. NORMABLATE_PG_ALLOW=10.1.0.0/16: the server then listens on every interface and trusts
# that network without a password -- use it inside a private cluster network only.
# Stop it with:  pg_ctl -D DATA_DIR stop   (as the cluster's owner; as root: runuser -u postgres -- ...)
set -euo pipefail

PORT="${2:-5432}"
DATA="$(realpath -m "${1:-/var/tmp/normablate-pg-$PORT}")"
BIN="${NORMABLATE_PG_BIN:-/usr/lib/postgresql/15/bin}"
ALLOW="${NORMABLATE_PG_ALLOW:-127.0.0.1/32}"
DB=optuna

if [ ! -x "$BIN/pg_ctl" ] || [ ! -x "$BIN/initdb" ]; then
  echo "error: no PostgreSQL server binaries in $BIN (install postgresql-15 or set NORMABLATE_PG_BIN)" >&2
  exit 2
fi
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$DATA"; fi
  chmod 700 "$DATA"
  as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 >/dev/null
  if [ "$ALLOW" != "127.0.0.1/32" ]; then
    echo "host all all $ALLOW trust" | as_owner tee -a "$DATA/pg_hba.conf" >/dev/null
  fi
fi
if [ "$ALLOW" = "127.0.0.1/32" ]; then LISTEN=127.0.0.1; HOST=127.0.0.1; else LISTEN='*'; HOST="$(hostname -f)"; fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-p $PORT -k $DATA -c listen_addresses='$LISTEN' -c max_connections=200" start >/dev/null
fi
if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" \
     | grep -q 1; then
  as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "PostgreSQL running: data $DATA, log $DATA/server.log; stop with: pg_ctl -D $DATA stop" >&2
echo "postgresql://postgres@$HOST:$PORT/$DB"
