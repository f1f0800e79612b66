"""Talking to PostgreSQL: the child environment for pg_dump/psql, a psycopg connection, version checks.

The password travels only as PGPASSWORD in a child's environment, built from scratch here so that no
other secret of the sidecar's own environment (DATABASE_URL, S3 keys, ...) is inherited by pg_dump.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import psycopg

from app.errors import SidecarError
from app.settings import DatabaseSettings

#: Variables of the sidecar's environment that children may inherit (no secrets among them).
_INHERIT = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR", "PGSSLMODE",
            "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGOPTIONS", "PGTZ", "PGCLIENTENCODING")

APP_NAME = "backup-sidecar"


class PgError(SidecarError):
    """A database-side failure, as one masked line with a hint."""


@dataclass(frozen=True)
class Versions:
    client: str
    client_major: int
    server: str
    server_major: int


def child_env(db: DatabaseSettings, app_name: str = APP_NAME) -> dict[str, str]:
    """Environment for pg_dump/pg_restore/psql: connection as PG* variables, password only as PGPASSWORD."""
    env = {k: os.environ[k] for k in _INHERIT if k in os.environ}
    env.update(dict(db.libpq_env))
    env.update(
        PGHOST=db.host,
        PGPORT=str(db.port),
        PGUSER=db.user,
        PGCONNECT_TIMEOUT=str(db.connect_timeout),
        PGAPPNAME=app_name,
    )
    if db.password:
        env["PGPASSWORD"] = db.password
    return env


def connect(db: DatabaseSettings, dbname: str, app_name: str = APP_NAME, autocommit: bool = True) -> psycopg.Connection:
    """A psycopg connection with the same parameters pg_dump gets; errors become PgError with a hint."""
    params: dict[str, str | int] = {k: v for k, v in (
        (_LIBPQ_KEYWORD.get(var, ""), value) for var, value in db.libpq_env
    ) if k}
    params.update(host=db.host, port=db.port, user=db.user, dbname=dbname,
                  connect_timeout=db.connect_timeout, application_name=app_name)
    if db.password:
        params["password"] = db.password
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        raise PgError(explain(exc, db, dbname)) from exc


_LIBPQ_KEYWORD = {
    "PGHOSTADDR": "hostaddr", "PGSSLMODE": "sslmode", "PGSSLROOTCERT": "sslrootcert", "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey", "PGTARGETSESSIONATTRS": "target_session_attrs", "PGOPTIONS": "options",
}


def explain(exc: BaseException | str, db: DatabaseSettings, dbname: str) -> str:
    """One line for a libpq/pg_dump failure, with the hint an operator needs at 3 a.m."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    first = _NOISE.sub("", first).strip() or first  # the server's own words, without libpq's preamble
    where = f"{db.user}@{db.host}:{db.port}/{dbname}"
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        hint = "check POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE and POSTGRES_USER"
    elif "does not exist" in low and "database" in low:
        hint = "check POSTGRES_DB: the database is missing on that server"
    elif "role" in low and "does not exist" in low:
        hint = "check POSTGRES_USER: the role is missing on that server"
    elif "connection refused" in low or "could not connect" in low and "refused" in low:
        hint = "check POSTGRES_HOST and POSTGRES_PORT, and that the server is up and listening"
    elif "could not translate host name" in low or "name or service not known" in low:
        hint = "check POSTGRES_HOST: the name does not resolve"
    elif "timeout" in low or "timed out" in low:
        hint = "the server did not answer in time: check the network path and POSTGRES_CONNECT_TIMEOUT"
    elif "permission denied" in low:
        hint = "the backup role lacks rights: grant it read access (e.g. pg_read_all_data)"
    elif "no pg_hba.conf entry" in low:
        hint = "allow the sidecar's address in the server's pg_hba.conf"
    elif "server version mismatch" in low or "aborting because of server version mismatch" in low:
        hint = "use an image whose pg_dump is at least the server's major version (PG_MAJOR build argument)"
    else:
        hint = "see the PostgreSQL server's log for details"
    return f"{where}: {first} (hint: {hint})"


#: libpq/pg_dump wrapping around the server's message: "pg_dump: error: connection to server at "h" (1.2.3.4),
#: port 5432 failed: FATAL:  password authentication failed ..." keeps only the part after FATAL.
_NOISE = re.compile(
    r'(?:pg_dump(?:all)?: error: |connection failed: |connection to server (?:at|on) .*?(?:port \d+ )?failed: '
    r'|(?:FATAL|ERROR):\s+)'
)


def client_version(binary: str = "pg_dump") -> tuple[str, int]:
    """Version of a client binary, e.g. ("15.20", 15); PgError with a hint when it is missing."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except FileNotFoundError as exc:
        raise PgError(f"{binary} is not installed or not on PATH (hint: install postgresql-client)") from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise PgError(f"{binary} --version failed: {exc} (hint: check the postgresql-client install)") from exc
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not m:
        raise PgError(f"cannot read the version of {binary} from {out.strip()!r} (hint: check postgresql-client)")
    return m.group(0), int(m.group(1))


def server_version(conn: psycopg.Connection) -> tuple[str, int]:
    num = conn.info.server_version  # e.g. 150020 or 90624
    major = num // 10000 if num >= 100000 else num // 100
    raw = conn.execute("SHOW server_version").fetchone()
    return (str(raw[0]).split()[0] if raw else str(num)), major


def check_versions(db: DatabaseSettings, dbname: str, conn: psycopg.Connection, binary: str = "pg_dump") -> Versions:
    """Refuse early, with what to do, when pg_dump is older than the server (it would refuse mid-run)."""
    client, client_major = client_version(binary)
    server, server_major = server_version(conn)
    if server_major > client_major:
        raise PgError(
            f"{db.host}:{db.port}/{dbname}: server is PostgreSQL {server} but {binary} is {client}; {binary} cannot "
            f"dump a newer server (hint: use an image with postgresql-client {server_major} or newer, e.g. build "
            f"with --build-arg PG_MAJOR={server_major})"
        )
    return Versions(client, client_major, server, server_major)


def list_databases(conn: psycopg.Connection) -> list[str]:
    """Connectable, non-template databases, for POSTGRES_DB=*."""
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"
    ).fetchall()
    return [r[0] for r in rows]
