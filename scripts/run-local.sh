#!/usr/bin/env bash
# Run the sidecar on this machine with no settings: it backs up a local PostgreSQL into ./backups, then keeps
# running on its schedule and serves /health and /metrics on http://127.0.0.1:8080.
# When no PostgreSQL answers on localhost:5432 and no database is configured, it starts a throwaway local
# cluster (data in .local/pg, removed on exit) with a small sample database "app", and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c "import app, minio, psycopg, schedule, flask, waitress, zstandard" 2>/dev/null \
  || python3 -m pip install -q -e .

configured=false
for v in BACKUP_DATABASE_URL DATABASE_URL POSTGRES_HOST POSTGRES_PORT POSTGRES_DB POSTGRES_USER; do
  [ -n "${!v:-}" ] && configured=true
done
[ -f .env ] && grep -qE '^(BACKUP_DATABASE_URL|DATABASE_URL|POSTGRES_[A-Z_]+)=' .env && configured=true

cleanup() { :; }
if ! $configured && ! pg_isready -q -h localhost -p 5432 2>/dev/null; then
  mkdir -p .local
  umask 077
  python3 -c "import secrets; print(secrets.token_urlsafe(18))" > .local/pg-password
  port=$(python3 scripts/local_pg.py start --dir "$PWD/.local/pg" --password-file .local/pg-password)
  cleanup() { python3 scripts/local_pg.py stop --dir "$PWD/.local/pg"; rm -rf .local/pg .local/pg-password; }
  trap cleanup EXIT
  export POSTGRES_HOST=127.0.0.1 POSTGRES_PORT="$port" POSTGRES_USER=postgres POSTGRES_DB=app
  export POSTGRES_PASSWORD_FILE="$PWD/.local/pg-password"
  PGPASSWORD=$(cat .local/pg-password) psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c "CREATE DATABASE app" \
    -c "\\c app" \
    -c "CREATE TABLE notes AS SELECT g AS id, 'note ' || g AS body, now() AS created FROM generate_series(1, 1000) g"
  echo "run-local: no PostgreSQL answered on localhost:5432, so a throwaway one runs on port $port" \
       "with a sample database 'app' (removed on exit)" >&2
fi

export BACKUP_ON_START="${BACKUP_ON_START:-true}"
echo "run-local: backing up into ${NAS_PATH:-./backups}; health at http://127.0.0.1:${HEALTH_PORT:-8080}/health" >&2
python3 -m app run &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child; cleanup' INT TERM
wait $child
