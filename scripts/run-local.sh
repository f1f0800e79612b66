#!/usr/bin/env bash
# Run the sidecar on this machine: it backs up a PostgreSQL database into ./backups, then keeps running on
# its schedule and serves /health and /metrics on http://127.0.0.1:8080 (another free port if 8080 is taken).
#
# Set-up first (scripts/setup.sh: Debian packages, the .venv virtualenv, pip install -e .).
# With no database configured (no BACKUP_DATABASE_URL, DATABASE_URL or POSTGRES_HOST/PORT/USER/PASSWORD/DB in
# the environment or ./.env) it starts a throwaway PostgreSQL cluster on a free port with a small sample
# database "app" and backs that up; the cluster is removed on exit, the backups stay. Otherwise it backs up
# the configured database. BACKUP_ON_START=true, so the first backup happens at once.
#
# Everything a second shell needs to run the other commands against the same database, backups, lock and
# /health is written to .local/run-local.env (and printed):  source .local/run-local.env
#
#   scripts/run-local.sh                 run until Ctrl-C
#   scripts/run-local.sh --setup-only    only the set-up
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
bs_setup run
if [ "${1:-}" = "--setup-only" ]; then
  bs_say "ready: $BS_VENV"
  exit 0
fi

say() { echo "run-local: $*" >&2; }
root="$PWD"
state="$root/.local"
envfile="$state/run-local.env"
mkdir -p "$state"
chmod 700 "$state"
exec 9>"$state/run-local.lock"
if ! flock -n 9; then
  say "another scripts/run-local.sh runs in $root (hint: use it: source $envfile; or stop it first)"
  exit 1
fi

# What the operator configured: the environment, then .env (or ENV_FILE), as the sidecar reads them.
eval "$("$BS_PYTHON" - <<'PY'
import os, re, shlex
from dotenv import dotenv_values
env = dict(os.environ)
path = os.environ.get("ENV_FILE") or ".env"
if os.path.isfile(path):
    for key, value in dotenv_values(path).items():
        env.setdefault(key, value or "")
db = r"(BACKUP_DATABASE_URL|DATABASE_URL|POSTGRES_(HOST|PORT|USER|PASSWORD|DB))(_FILE)?"
configured = sorted(k for k, v in env.items() if v and re.fullmatch(db, k))
print(f"configured={shlex.quote(' '.join(configured))}")
print(f"from_environment={shlex.quote(' '.join(k for k in configured if os.environ.get(k)))}")
print(f"env_file={shlex.quote(os.path.abspath(path) if os.path.isfile(path) else '')}")
for name in ("NAS_PATH", "S3_BUCKET", "HEALTH_PORT", "HEALTH_BIND", "LOCK_FILE"):
    print(f"user_{name}={shlex.quote(env.get(name, ''))}")
PY
)"

pgdir=""
cleanup() {
  if [ -n "$pgdir" ]; then
    "$BS_PYTHON" scripts/local_pg.py stop --dir "$pgdir" || true
    rm -rf "$pgdir"
    say "the throwaway PostgreSQL is stopped and removed; the backups stay in ${NAS_PATH:-./backups}"
  fi
  rm -f "$envfile" "$state/pg-password" "$state/pgpass"
}
trap cleanup EXIT
rm -f "$envfile"

exports=()
add() { exports+=("export $1=$(printf '%q' "$2")"); export "$1=$2"; }

if [ -n "$env_file" ]; then
  add ENV_FILE "$env_file"  # so the sidecar reads the same .env from any directory
fi
if [ -z "$configured" ]; then
  umask 077
  "$BS_PYTHON" -c "import secrets; print(secrets.token_urlsafe(18))" >"$state/pg-password"
  pgdir="$(mktemp -d "${TMPDIR:-/tmp}/backup-sidecar-local-pg.XXXXXX")"
  port="$("$BS_PYTHON" scripts/local_pg.py start --dir "$pgdir" --password-file "$state/pg-password")"
  umask 022
  printf '127.0.0.1:%s:*:postgres:%s\n' "$port" "$(cat "$state/pg-password")" >"$state/pgpass"
  chmod 600 "$state/pgpass"
  PGPASSFILE="$state/pgpass" psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c "CREATE DATABASE app" \
    -c "\\c app" \
    -c "CREATE TABLE notes AS SELECT g AS id, 'note ' || g AS body, now() AS created FROM generate_series(1, 1000) g"
  add POSTGRES_HOST 127.0.0.1
  add POSTGRES_PORT "$port"
  add POSTGRES_USER postgres
  add POSTGRES_DB app
  add POSTGRES_PASSWORD_FILE "$state/pg-password"
  # for psql and friends in the second shell (the password comes from a pgpass file, not the environment)
  add PGHOST 127.0.0.1
  add PGPORT "$port"
  add PGUSER postgres
  add PGDATABASE app
  add PGPASSFILE "$state/pgpass"
  say "no database is configured, so a throwaway PostgreSQL runs on 127.0.0.1:$port with a sample database" \
      "'app' (removed on exit; set POSTGRES_HOST/... or DATABASE_URL to back up your own)"
else
  say "backing up the configured database ($configured)"
  for name in $from_environment; do  # .env reaches the second shell through ENV_FILE; the environment does not
    case "$name" in
      *_FILE|POSTGRES_HOST|POSTGRES_PORT|POSTGRES_USER|POSTGRES_DB) add "$name" "${!name}" ;;
      *) exports+=("# $name came from run-local's environment: set it in this shell too (a secret is not written to disk)") ;;
    esac
  done
fi
if [ -z "$user_NAS_PATH" ] && [ -z "$user_S3_BUCKET" ]; then
  mkdir -p "$root/backups"
  add NAS_PATH "$root/backups"
  add NAS_REQUIRE_MOUNT false  # a local try-out: the backups stay on this disk by design
elif [ -n "$user_NAS_PATH" ]; then
  add NAS_PATH "$(cd "$user_NAS_PATH" 2>/dev/null && pwd || echo "$user_NAS_PATH")"
fi
[ -n "$user_LOCK_FILE" ] || add LOCK_FILE "$state/backup-sidecar.lock"
port_free() { "$BS_PYTHON" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $1)) == 0)"; }
health_port="${user_HEALTH_PORT:-8080}"
if [ -z "$user_HEALTH_PORT" ] && ! port_free 8080; then
  health_port="$("$BS_PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
  say "port 8080 is taken, so /health listens on $health_port"
fi
add HEALTH_PORT "$health_port"
[ -n "$user_HEALTH_BIND" ] || add HEALTH_BIND 127.0.0.1
add HEALTH_URL "http://127.0.0.1:$health_port/health"
exports+=("export PATH=$(printf '%q' "$BS_VENV/bin"):\$PATH")  # backup-sidecar on PATH (bs_setup put it here)

{
  echo "# Written by scripts/run-local.sh (pid $$) at $(date -u +%FT%TZ); valid while it runs. In another shell:"
  echo "#   source $envfile"
  printf '%s\n' "${exports[@]}"
} >"$envfile"

export BACKUP_ON_START="${BACKUP_ON_START:-true}"
say "backups go to ${NAS_PATH:-S3 only (S3_BUCKET)}; /health at $HEALTH_URL"
say "in another shell:  source $envfile"
say "  then e.g.: backup-sidecar list; backup-sidecar verify latest --restore-test;"
say "             backup-sidecar restore latest --to-db app_copy --create --yes; backup-sidecar health"
sed 's/^/run-local:   /' "$envfile" >&2
backup-sidecar run &
child=$!
stopping=false
trap 'stopping=true; kill -TERM "$child" 2>/dev/null || true' INT TERM
status=0
wait "$child" || status=$?
if $stopping; then  # the signal interrupted `wait`: the sidecar's own exit status comes from waiting again
  status=0
  wait "$child" || status=$?
fi
exit "$status"
