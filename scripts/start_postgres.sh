#!/usr/bin/env bash
# Start a local PostgreSQL cluster for a normablate sweep and print the --storage URL to use.
#
#   scripts/start_postgres.sh [DATA_DIR] [PORT]          # defaults: /var/tmp/normablate-pg-PORT, 5432
#   normablate sweep --config SPEC --storage "$(scripts/start_postgres.sh | tail -n 1)"
#
# Re-running it on the same DATA_DIR starts the existing cluster again (the study is kept). The server binaries
# come from $NORMABLATE_PG_BIN or /usr/lib/postgresql/15/bin. PostgreSQL refuses to run as root, so as root the
# cluster belongs to the `postgres` user (via runuser); DATA_DIR must then be a place that user can reach.
# Access: password only (scram-sha-256), for every connection, local ones included: clusters live on shared login
# nodes, where any local OS user could otherwise connect as the superuser. The first run generates a password and
# keeps it in DATA_DIR.password (or $NORMABLATE_PG_PASSWORD_FILE), readable by you only (mode 0600); the printed
# URL carries it (normablate masks it in what it prints). A cluster made by an older version of this script (trust
# authentication) is given a password and switched to scram-sha-256 on its next start.
# By default the server listens on 127.0.0.1 only. For workers on other machines set NORMABLATE_PG_ALLOW to their
# network, e.g. NORMABLATE_PG_ALLOW=10.1.0.0/16: the server then listens on every interface and accepts that
# network with the password (never without one).
# Stop it with:  pg_ctl -D DATA_DIR stop   (as the cluster's owner; as root: runuser -u postgres -- ...)
set -euo pipefail

PORT="${2:-5432}"
DATA="$(realpath -m "${1:-/var/tmp/normablate-pg-$PORT}")"
BIN="${NORMABLATE_PG_BIN:-/usr/lib/postgresql/15/bin}"
ALLOW="${NORMABLATE_PG_ALLOW:-127.0.0.1/32}"
PWFILE="${NORMABLATE_PG_PASSWORD_FILE:-$DATA.password}"
DB=optuna

if [ ! -x "$BIN/pg_ctl" ] || [ ! -x "$BIN/initdb" ]; then
  echo "error: no PostgreSQL server binaries in $BIN (install postgresql-15 or set NORMABLATE_PG_BIN)" >&2
  exit 2
fi
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# the password: generated once (hex: safe in a URL), kept in a file only its owner can read
if [ ! -s "$PWFILE" ]; then
  if [ -f "$DATA/PG_VERSION" ] && ! grep -Eq '^[^#]*[[:space:]]trust([[:space:]]|$)' "$DATA/pg_hba.conf" 2>/dev/null; then
    echo "error: the cluster in $DATA needs a password, but its file $PWFILE is missing; point" \
         "NORMABLATE_PG_PASSWORD_FILE at it, or start a new cluster with another DATA_DIR" >&2
    exit 2
  fi
  (umask 077; mkdir -p "$(dirname "$PWFILE")"; od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$PWFILE")
fi
chmod 600 "$PWFILE"
PW="$(tr -d '\n' < "$PWFILE")"
if ! [[ "$PW" =~ ^[A-Za-z0-9._~-]+$ ]]; then
  echo "error: the password in $PWFILE must be letters, digits and . _ ~ - only (it goes into a URL)" >&2
  exit 2
fi
psql_as_owner() { as_owner env PGPASSWORD="$PW" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$DATA"; fi
  chmod 700 "$DATA"
  SEED_DIR="$(mktemp -d)"  # initdb reads the password from a file its (postgres) user can read; removed at once
  trap 'rm -rf "$SEED_DIR"' EXIT
  (umask 077; printf '%s\n' "$PW" > "$SEED_DIR/pw")
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$SEED_DIR"; fi
  as_owner "$BIN/initdb" -D "$DATA" -U postgres -A scram-sha-256 --pwfile="$SEED_DIR/pw" -E UTF8 >/dev/null
  rm -rf "$SEED_DIR"
  if [ "$ALLOW" != "127.0.0.1/32" ]; then
    echo "host all all $ALLOW scram-sha-256" | as_owner tee -a "$DATA/pg_hba.conf" >/dev/null
  fi
fi
if [ "$ALLOW" = "127.0.0.1/32" ]; then LISTEN=127.0.0.1; HOST=127.0.0.1; else LISTEN='*'; HOST="$(hostname -f)"; fi

if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
  as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-p $PORT -k $DATA -c listen_addresses='$LISTEN' -c max_connections=200" start >/dev/null
fi
if grep -Eq '^[^#]*[[:space:]]trust([[:space:]]|$)' "$DATA/pg_hba.conf"; then  # made by an older version: upgrade
  psql_as_owner -qc "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '$PW'" >/dev/null
  as_owner sed -i -E 's/^([^#]*[[:space:]])trust([[:space:]]|$)/\1scram-sha-256\2/' "$DATA/pg_hba.conf"
  as_owner "$BIN/pg_ctl" -D "$DATA" reload >/dev/null
  echo "switched the cluster in $DATA from trust to password (scram-sha-256) authentication" >&2
fi
if ! psql_as_owner -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
  as_owner env PGPASSWORD="$PW" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
fi
echo "PostgreSQL running: data $DATA, log $DATA/server.log, password in $PWFILE (mode 0600); stop with:" \
     "pg_ctl -D $DATA stop" >&2
echo "postgresql://postgres:$PW@$HOST:$PORT/$DB"
